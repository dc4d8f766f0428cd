"""Upscaler models through the command bus and the real executor: configured `[[upscalers]]`
checked at start-up and listed, a hires fix through a model, and UpscaleImage as a recorded
job of the generation path (tiles as progress, A1111's postprocessing text, an earlier image
by id, refusals before anything is queued)."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server.application.commands import (
    GenerateImageCommand,
    GenerationRequest,
    HiresRequest,
    ImageInput,
    UpscaleImageCommand,
    UpscaleRequest,
)
from server.application.context import DispatchContext
from server.application.queries import GetGenerationQuery, ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_upscalers import write_tiny_compact, write_tiny_esrgan
from server.domain import generation_events as gen
from server.domain.errors import PreconditionError, Reason, ValidationError
from server.domain.models import Architecture, BaseModelConfig, UpscalerModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_sd15
from tests.hostile_images import noise

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[UpscalerModelConfig, ...]]:
    root = tmp_path_factory.mktemp("upscalers")
    broken = root / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    return build_tiny_sd15(root / "sd"), (
        UpscalerModelConfig("4x-Compact", write_tiny_compact(root / "compact.safetensors")),
        UpscalerModelConfig("4x-UltraTiny", write_tiny_esrgan(root / "esrgan.safetensors")),
        UpscalerModelConfig("broken", broken),
    )


@pytest.fixture
def c(tmp_path: Path, files: tuple[Path, tuple[UpscalerModelConfig, ...]]) -> Iterator[Container]:
    model, upscalers = files
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=(BaseModelConfig("sd", Architecture.SD1, model),),
        upscalers=upscalers,
    )
    container = bootstrap(settings)
    yield container
    container.close()


def png(image: Image.Image, parameters: str = "") -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def finished(events: list[gen.GenerationEvent]) -> Image.Image:
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return Image.open(io.BytesIO(data))


def upscale(c: Container, **fields: Any) -> list[gen.GenerationEvent]:
    request = UpscaleRequest(**({"image": ImageInput(data=png(noise(250, 150)))} | fields))
    return list(c.commands.stream(UpscaleImageCommand(request=request), ALICE))


def test_upscaler_models_are_checked_at_start_up_and_listed(c: Container) -> None:
    listing = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data
    status = {u.config.name: (u.ready, u.architecture, u.scale) for u in listing.upscaler_models}
    assert status["4x-Compact"] == (True, "Compact", 4)
    assert status["4x-UltraTiny"] == (True, "ESRGAN", 4)
    broken = next(u for u in listing.upscaler_models if u.config.name == "broken")
    assert not broken.ready
    assert "not a safetensors file" in broken.error


def test_a_hires_fix_through_an_upscaler_model(c: Container) -> None:
    def hires(upscaler: str) -> Image.Image:
        request = GenerationRequest(
            model="sd", prompt="a fox", steps=2, seed=4, width=64, height=64,
            hires=HiresRequest(scale=2.0, steps=2, upscaler=upscaler),
        )  # fmt: skip
        return finished(list(c.commands.stream(GenerateImageCommand(request=request), ALICE)))

    modelled = hires("4x-compact")  # case aside
    assert modelled.size == (128, 128)
    assert "Hires upscaler: 4x-Compact" in modelled.info["parameters"]
    again = hires("4x-Compact")
    assert np.array_equal(np.asarray(again), np.asarray(modelled))
    assert not np.array_equal(np.asarray(hires("Lanczos")), np.asarray(modelled))


def test_upscale_image_streams_tiles_and_keeps_the_parameters(c: Container) -> None:
    source = png(noise(250, 150), parameters="a fox\nSteps: 4, Seed: 1, Model: sd")
    events = upscale(c, image=ImageInput(data=source), upscaler="4x-Compact")
    image = finished(events)
    assert image.size == (1000, 600)  # the model's own factor
    progress = [
        (e.payload.step, e.payload.total_steps)
        for e in events
        if isinstance(e.payload, gen.Progress)
    ]
    assert progress == [(1, 2), (2, 2)]  # 250x150 in 192-pixel tiles
    assert isinstance(events[-1].payload, gen.Completed)
    assert image.info["parameters"] == "a fox\nSteps: 4, Seed: 1, Model: sd"
    assert image.info["postprocessing"] == (
        "Postprocess upscale by: 4, Postprocess upscaler: 4x-Compact"
    )
    manifest = json.loads(image.info["loracle"])
    assert manifest["mode"] == "upscale"
    assert manifest["upscale"] == {"upscaler": "4x-Compact", "scale": 4.0}
    # Any factor: the model runs until the image is covered, then Lanczos.
    events = upscale(c, image=ImageInput(data=source), upscaler="4x-UltraTiny", scale=6)
    assert finished(events).size == (1500, 900)
    steps = {e.payload.total_steps for e in events if isinstance(e.payload, gen.Progress)}
    assert steps == {2 + 24}
    assert finished(upscale(c, upscaler="Lanczos")).size == (500, 300)


def test_an_upscale_is_recorded_and_an_earlier_image_can_be_upscaled(c: Container) -> None:
    request = GenerationRequest(model="sd", prompt="a fox", steps=2, seed=4, width=64, height=64)
    generated = list(c.commands.stream(GenerateImageCommand(request=request), ALICE))
    gid = generated[0].generation_id
    events = upscale(c, image=ImageInput(generation_id=gid), upscaler="4x-Compact", scale=2)
    image = finished(events)
    assert image.size == (128, 128)
    assert image.info["parameters"].startswith("a fox\nSteps: 2")  # the generation's own
    c.recorder.flush()
    c.projector.wait_for(c.store.max_position(), 5.0)
    view = c.queries.dispatch(GetGenerationQuery(generation_id=events[0].generation_id), ALICE).data
    assert view.spec["upscale"] == {"upscaler": "4x-Compact", "scale": 2.0}
    assert view.spec["init_image"]["generation_id"] == gid
    assert view.spec["model"] == ""
    assert len(view.images) == 1


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"upscaler": "Latent"}, "upscaler", "resizes latents"),
        ({"upscaler": "8x-Nope"}, "upscaler", "one of Latent, "),
        ({"upscaler": ""}, "upscaler", "must name an upscaler"),
        ({"upscaler": "Lanczos", "scale": 9.0}, "scale", "at most 8"),
        ({"upscaler": "4x-Compact", "scale": 8.0, "image": None}, "image", "is required"),
        ({"upscaler": "Lanczos", "image": ImageInput(data=b"no")}, "image", ""),
    ],
)
def test_bad_upscales_name_the_field(
    c: Container, fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as err:
        upscale(c, **fields)
    (violation,) = err.value.violations
    assert violation.field == field
    assert words in violation.description
    assert c.executor.queue_depth() == 0


def test_a_broken_upscaler_or_an_upscale_spec_in_a_generation_is_refused(c: Container) -> None:
    with pytest.raises(PreconditionError) as err:
        upscale(c, upscaler="broken")
    assert err.value.reason is Reason.UPSCALER_NOT_READY
    request = dataclasses.replace(GenerationRequest(prompt="x"), upscale_given=True)
    with pytest.raises(ValidationError) as refused:
        list(c.commands.stream(GenerateImageCommand(request=request), ALICE))
    assert [v.field for v in refused.value.violations] == ["spec.upscale"]
