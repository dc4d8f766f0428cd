"""FLUX.1 as a family, on a tiny random-weight FluxPipeline built locally (a two-layer
transformer, a 16-channel VAE, tiny CLIP and T5 with local tokenizers) and loaded through the
real loading code: listed with its defaults and samplers, text to image, img2img and
inpainting through the command bus, previews from its packed latents, the same image whatever
the batch, Forge's `Distilled CFG Scale` in the parameters, and what it does not take refused
before queueing."""

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
from server.infrastructure.diffusion.placeholder import build_tiny_flux
from server.infrastructure.diffusion.registry import inspect_model, load_pipeline
from tests.hostile_images import noise

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BaseModelConfig:
    folder = build_tiny_flux(tmp_path_factory.mktemp("flux") / "flux-tiny")
    return BaseModelConfig("flux", Architecture.FLUX, folder)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory, model: BaseModelConfig) -> Path:
    """A peft-format LoRA for the tiny transformer and CLIP encoder; its keys say FLUX."""
    root = tmp_path_factory.mktemp("flux-loras")
    write_lora_for_pipeline(load_pipeline(model), root / "ink_flux.safetensors", seed=4)
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
    base = GenerationRequest(model="flux", prompt="a red fox", steps=3, seed=5, width=64, height=64)
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


def test_flux_is_listed_with_its_defaults_and_samplers(c: Container) -> None:
    (info,) = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data.models
    assert info.ready, info.error
    assert (info.defaults.width, info.defaults.steps, info.defaults.guidance_scale) == (
        1024,
        28,
        3.5,
    )
    assert info.schedulers == ("flow_euler",)
    assert not info.takes_negative_prompt


def test_text_to_image_with_distilled_guidance_and_previews(c: Container) -> None:
    events = events_of(c, preview_every_n_steps=1)
    image = image_of(events)
    assert image.size == (64, 64)
    parameters = image.info["parameters"]
    assert "Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 5" in parameters
    previews = [e.payload for e in events if isinstance(e.payload, gen.Preview)]
    assert [p.step for p in previews] == [1, 2]  # none at the last step: the image follows
    # Unpacked from (1, 16 x 16 patches, 64) to 16 channels at the VAE's scale (the tiny
    # VAE's is 2): a 32 x 32 preview.
    assert Image.open(io.BytesIO(previews[0].jpeg)).size == (32, 32)
    assert np.array_equal(pixels(events_of(c)), pixels(events))  # deterministic
    assert not np.array_equal(pixels(events_of(c, guidance_scale=1.0)), pixels(events))
    assert np.array_equal(pixels(events_of(c, scheduler="flow_euler")), pixels(events))


def test_true_cfg_takes_a_negative_prompt_beside_the_distilled_guidance(c: Container) -> None:
    plain = pixels(events_of(c))
    events = events_of(c, true_cfg_scale=4.0, negative_prompt="blurry")
    parameters = image_of(events).info["parameters"]
    assert "Negative prompt: blurry" in parameters
    assert "CFG scale: 4, Distilled CFG Scale: 3.5" in parameters
    guided = pixels(events)
    assert not np.array_equal(guided, plain)
    # Its own negative prompt steers it: an empty one is another image.
    assert not np.array_equal(pixels(events_of(c, true_cfg_scale=4.0)), guided)
    # A batch never mixes true CFG (two passes a step) with plain FLUX.
    submitted = [
        c.commands.dispatch(SubmitGenerationCommand(request=request(**s)), ALICE).unwrap()[0]
        for s in ({"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, {})
    ]
    for gid, expected in zip(submitted, (guided, plain), strict=True):
        handle = c.generations.handle(str(gid))
        assert handle is not None
        events = list(handle.events())
        assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 1 for e in events)
        assert np.array_equal(pixels(events), expected)


def test_a_flux_lora_is_detected_applied_and_removed_exactly(c: Container) -> None:
    updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), ALICE))
    assert updates[-1].totals.registered == 1, updates[-1]
    c.projector.catch_up()
    (lora,) = c.read_model.find_by_file_name("ink_flux")
    assert lora.metadata.base_model.architecture is Architecture.FLUX  # from its keys
    plain = pixels(events_of(c))
    with_lora = events_of(c, loras=(LoraChoice("ink_flux", 1.0),))
    assert not np.array_equal(pixels(with_lora), plain)
    assert 'Lora hashes: "ink_flux: ' in image_of(with_lora).info["parameters"]
    assert np.array_equal(pixels(events_of(c)), plain)  # the base weights come back exactly


def test_the_same_image_whatever_the_batch(c: Container) -> None:
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


def test_img2img_and_inpainting(c: Container) -> None:
    init = png(noise(64, 64, 3))
    varied = events_of(c, init_image=ImageInput(data=init), strength=0.5, steps=4)
    assert image_of(varied).size == (64, 64)
    steps = {e.payload.total_steps for e in varied if isinstance(e.payload, gen.Progress)}
    assert steps == {2}  # 4 steps x 0.5
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    painted = events_of(
        c, init_image=ImageInput(data=init), mask_image=ImageInput(data=png(mask)), mask_blur=0
    )
    kept = np.asarray(mask) == 0
    assert np.array_equal(pixels(painted)[kept], np.asarray(Image.open(io.BytesIO(init)))[kept])


def test_a_diffusers_layout_transformer_file_is_not_ready(model: BaseModelConfig) -> None:
    """Single files are BFL's layout (tests/integration/test_transformer_files.py); a
    diffusers transformer's own weights file is not one."""
    transformer = next((model.path / "transformer").glob("*.safetensors"))
    single = BaseModelConfig("f", Architecture.FLUX, transformer, config_dir=model.path)
    error, _ = inspect_model(single)
    assert error == (
        f"{transformer} is not an original-layout FLUX checkpoint: lacks the FLUX "
        "transformer (double_blocks.*)"
    )


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_hires_fix_unpacks_latents_or_upscales_images(c: Container, upscaler: str) -> None:
    """FLUX's first-pass latents come out packed in 2x2 patches: a latent upscaler resizes
    them unpacked, and the img2img pipeline packs them again."""
    hires = HiresRequest(scale=2.0, steps=4, upscaler=upscaler)  # second pass at 0.7
    events = events_of(c, hires=hires, steps=4)
    assert image_of(events).size == (128, 128)
    progress = [
        (e.payload.step, e.payload.total_steps)
        for e in events
        if isinstance(e.payload, gen.Progress)
    ]
    assert progress == [(step, 7) for step in range(1, 8)]  # 4, then 3 of 4 at 0.7
    assert "Hires upscale: 2" in image_of(events).info["parameters"]


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"scheduler": "euler_a"}, "spec.scheduler", "samples with flow_euler, or empty"),
        (
            {"negative_prompt": "blurry"},
            "spec.negative_prompt",
            "takes no negative prompt unless true_cfg_scale is above 1",
        ),
        ({"true_cfg_scale": 0.5}, "spec.true_cfg_scale", "from 1 to 30"),
        ({"width": 72}, "spec.width", "takes sizes in multiples of 16"),
    ],
)
def test_what_flux_does_not_take_is_refused_before_queueing(
    c: Container, spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as err:
        events_of(c, **spec)
    (violation,) = err.value.violations
    assert violation.field == field
    assert words in violation.description
    assert c.executor.queue_depth() == 0
