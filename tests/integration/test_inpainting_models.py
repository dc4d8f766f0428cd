"""Dedicated inpainting checkpoints (a 9-channel UNet: latents, mask, masked image) on tiny
random-weight SD1.5 and SDXL pipelines, as a diffusers folder and as a single file: detected at
start-up and listed as such, every mode run through the inpainting pipeline (text to image
and img2img under a white mask, as A1111 runs them), unmasked pixels kept, images that do not
depend on their batch, and the hires fix refused before queueing."""

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
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.single_file import write_single_file_checkpoint
from server.domain import generation_events as gen
from server.domain.errors import ValidationError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from tests.hostile_images import noise

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModelConfig, ...]:
    root = tmp_path_factory.mktemp("inpainting-models")
    sd = build_tiny_sd15(root / "sd-inpainting", inpainting=True)
    plain = build_tiny_sd15(root / "sd")
    single = write_single_file_checkpoint(sd, root / "sd-inpainting.safetensors")
    return (
        BaseModelConfig("sd-inpainting", Architecture.SD1, sd),
        BaseModelConfig(
            "xl-inpainting", Architecture.SDXL, build_tiny_sdxl(root / "xl", inpainting=True)
        ),
        BaseModelConfig("file", Architecture.SD1, single, config_dir=sd),
        BaseModelConfig("file-with-txt2img-configs", Architecture.SD1, single, config_dir=plain),
        BaseModelConfig("sd", Architecture.SD1, plain),
    )


@pytest.fixture
def c(tmp_path: Path, models: tuple[BaseModelConfig, ...]) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path, storage_url="memory://", models=models, max_batch=8, batch_wait_ms=300
    )
    container = bootstrap(settings)
    yield container
    container.close()


def generate(c: Container, **spec: Any) -> list[gen.GenerationEvent]:
    base = GenerationRequest(
        model="sd-inpainting", prompt="a fox", steps=4, seed=3, width=64, height=64
    )
    request = dataclasses.replace(base, **spec)
    events = list(c.commands.stream(GenerateImageCommand(request=request), ALICE))
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    return events


def pixels(events: list[gen.GenerationEvent]) -> np.ndarray[Any, np.dtype[np.int16]]:
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_inpainting_checkpoints_are_detected_and_listed(c: Container) -> None:
    listing = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data
    status = {m.config.name: (m.ready, m.inpainting) for m in listing.models}
    assert status["sd-inpainting"] == (True, True)
    assert status["xl-inpainting"] == (True, True)
    assert status["file"] == (True, True)
    assert status["sd"] == (True, False)
    mismatched = next(m for m in listing.models if m.config.name == "file-with-txt2img-configs")
    assert not mismatched.ready
    assert "is an inpainting checkpoint (9-channel UNet) but config_dir's UNet takes 4" in (
        mismatched.error
    )


@pytest.mark.parametrize("model", ["sd-inpainting", "xl-inpainting", "file"])
def test_every_mode_runs_on_an_inpainting_checkpoint(c: Container, model: str) -> None:
    init = png(noise(64, 64, 1))
    text = generate(c, model=model)
    assert np.array_equal(pixels(generate(c, model=model)), pixels(text))  # deterministic
    varied = generate(c, model=model, init_image=ImageInput(data=init), strength=0.5)
    steps = [e.payload.total_steps for e in varied if isinstance(e.payload, gen.Progress)]
    assert set(steps) == {2}  # steps x strength, as for any img2img
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    painted = generate(
        c, model=model, init_image=ImageInput(data=init), mask_image=ImageInput(data=png(mask)),
        mask_blur=0,
    )  # fmt: skip
    kept = np.asarray(mask) == 0
    assert np.array_equal(pixels(painted)[kept], np.asarray(Image.open(io.BytesIO(init)))[kept])
    other = Image.new("L", (64, 64))
    other.paste(255, (8, 8, 56, 56))
    repainted = generate(
        c, model=model, init_image=ImageInput(data=init), mask_image=ImageInput(data=png(other)),
        mask_blur=0,
    )  # fmt: skip
    inside = np.asarray(mask) > 0
    # The UNet sees the mask and the masked image: another mask paints the region otherwise.
    assert not np.array_equal(pixels(repainted)[inside], pixels(painted)[inside])


def test_images_do_not_depend_on_their_batch(c: Container) -> None:
    specs: list[dict[str, Any]] = [{"seed": 1}, {"seed": 2, "prompt": "a hare"}]
    alone = [pixels(generate(c, **s)) for s in specs]
    base = GenerationRequest(model="sd-inpainting", prompt="a fox", steps=4, width=64, height=64)
    submitted = [
        c.commands.dispatch(
            SubmitGenerationCommand(request=dataclasses.replace(base, **s)), ALICE
        ).unwrap()[0]
        for s in specs
    ]
    for gid, expected in zip(submitted, alone, strict=True):
        handle = c.generations.handle(str(gid))
        assert handle is not None
        events = list(handle.events())
        assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 2 for e in events)
        assert np.abs(pixels(events) - expected).max() <= 1


def test_the_hires_fix_is_refused_on_an_inpainting_checkpoint(c: Container) -> None:
    request = GenerationRequest(
        model="sd-inpainting", prompt="x", steps=2, hires=HiresRequest(scale=2.0)
    )
    with pytest.raises(ValidationError) as err:
        c.commands.dispatch(SubmitGenerationCommand(request=request), ALICE).unwrap()
    (violation,) = err.value.violations
    assert violation.field == "spec.hires"
    assert violation.description == (
        "model 'sd-inpainting' is an inpainting checkpoint; the hires fix needs a "
        "text-to-image model"
    )
    assert c.executor.queue_depth() == 0
