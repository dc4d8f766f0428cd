"""img2img, inpainting and hires fix through the command bus and the real executor, on the
tiny SD1.5 and SDXL pipelines: input images inline or by reference to an earlier image,
pixels the mask leaves out unchanged, "only masked" pasted back at the init image's size, a
hires fix's two passes in one progress bar, the same image whatever the batch, metadata that
reproduces the generation, and bad input refused with the field before anything is queued."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from server.application.commands import (
    GenerateImageCommand,
    GenerationRequest,
    HiresRequest,
    ImageInput,
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext
from server.application.queries import GetGenerationQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain import generation_events as gen
from server.domain.errors import NotFoundError, ValidationError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from tests.hostile_images import bad_images, noise, odd_images

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
BOB = DispatchContext(principal="bob", scopes=frozenset({"read", "generate"}))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def square_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height))
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModelConfig, ...]:
    root = tmp_path_factory.mktemp("models")
    return (
        BaseModelConfig("sd", Architecture.SD1, build_tiny_sd15(root / "sd")),
        BaseModelConfig("sdxl", Architecture.SDXL, build_tiny_sdxl(root / "sdxl")),
    )


@pytest.fixture
def c(tmp_path: Path, models: tuple[BaseModelConfig, ...]) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=models,
        max_batch=8,
        batch_wait_ms=300,
    )
    container = bootstrap(settings)
    yield container
    container.close()


def generate(
    c: Container, ctx: DispatchContext | None = None, **spec: Any
) -> list[gen.GenerationEvent]:
    base = GenerationRequest(model="sd", prompt="a red fox", steps=4, seed=11)
    request = dataclasses.replace(base, **spec)
    events = list(c.commands.stream(GenerateImageCommand(request=request), ctx or ALICE))
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    return events


def image_of(events: list[gen.GenerationEvent], index: int = 0) -> Image.Image:
    data = b"".join(
        e.payload.data
        for e in events
        if isinstance(e.payload, gen.ImageChunk) and e.payload.image_index == index
    )
    return Image.open(io.BytesIO(data))


def progress(events: list[gen.GenerationEvent]) -> list[tuple[int, int]]:
    return [
        (e.payload.step, e.payload.total_steps)
        for e in events
        if isinstance(e.payload, gen.Progress)
    ]


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_img2img_starts_from_the_image_and_runs_steps_times_strength(
    c: Container, model: str
) -> None:
    init = noise(96, 64)
    weak = generate(c, model=model, init_image=ImageInput(data=png(init)), strength=0.5)
    assert progress(weak) == [(1, 2), (2, 2)]  # 4 steps x 0.5, as A1111 counts them
    image = image_of(weak)
    assert image.size == (96, 64)  # the init image's size when none is asked for
    # The random-weight VAE cannot reconstruct an image, so what is checked is that the
    # init image and the strength reach the pipeline, deterministically.
    pixels = np.asarray(image, dtype=np.int16)
    again = generate(c, model=model, init_image=ImageInput(data=png(init)), strength=0.5)
    assert np.array_equal(np.asarray(image_of(again), dtype=np.int16), pixels)
    other = generate(
        c, model=model, init_image=ImageInput(data=png(noise(96, 64, 7))), strength=0.5
    )
    assert np.abs(np.asarray(image_of(other), dtype=np.int16) - pixels).max() > 10
    strong = generate(c, model=model, init_image=ImageInput(data=png(init)), strength=1.0)
    assert np.abs(np.asarray(image_of(strong), dtype=np.int16) - pixels).max() > 10
    parameters = image.info["parameters"]
    assert "Denoising strength: 0.5" in parameters
    manifest = json.loads(image.info["loracle"])
    assert manifest["mode"] == "img2img"
    assert manifest["init_image"]["sha256"] == hashlib.sha256(png(init)).hexdigest()


def test_img2img_runs_at_least_one_step(c: Container) -> None:
    """1 step x strength 0.5 rounds to none in diffusers (which then fails): one runs."""
    events = generate(c, init_image=ImageInput(data=png(noise(64, 64))), steps=1, strength=0.5)
    assert progress(events) == [(1, 1)]


def test_an_init_image_is_resized_to_the_asked_size(c: Container) -> None:
    events = generate(c, init_image=ImageInput(data=png(noise(200, 120))), width=64, height=64)
    assert image_of(events).size == (64, 64)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_inpainting_keeps_every_pixel_the_mask_leaves_out(c: Container, model: str) -> None:
    init, mask = noise(96, 64, 1), square_mask(96, 64, (32, 16, 64, 48))
    events = generate(
        c,
        model=model,
        init_image=ImageInput(data=png(init)),
        mask_image=ImageInput(data=png(mask)),
        mask_blur=0,
    )
    out = np.asarray(image_of(events))
    start = np.asarray(init)
    kept = np.asarray(mask) == 0
    assert np.array_equal(out[kept], start[kept])
    assert np.abs(out[~kept].astype(int) - start[~kept]).mean() > 5  # the square was painted
    parameters = image_of(events).info["parameters"]
    assert "Mask blur: 0" in parameters


def test_only_masked_paints_the_region_at_full_size_and_pastes_it_back(c: Container) -> None:
    init, mask = noise(160, 120, 2), square_mask(160, 120, (70, 50, 90, 70))
    events = generate(
        c,
        init_image=ImageInput(data=png(init)),
        mask_image=ImageInput(data=png(mask)),
        inpaint_only_masked=True,
        inpaint_padding=8,
        width=64,
        height=64,
    )
    image = image_of(events)
    assert image.size == (160, 120)  # A1111: the init image's size, not width x height
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(4)))
    kept = blurred == 0
    out, start = np.asarray(image), np.asarray(init)
    assert np.array_equal(out[kept], start[kept])
    assert np.abs(out[~kept].astype(int) - start[~kept]).mean() > 5
    parameters = image.info["parameters"]
    assert "Inpaint area: Only masked, Masked area padding: 8" in parameters


def test_an_earlier_image_is_an_input_for_its_owner_only(c: Container) -> None:
    first = generate(c, width=64, height=64)
    gid = first[0].generation_id
    again = generate(c, init_image=ImageInput(generation_id=gid, image_index=0), strength=0.3)
    assert image_of(again).size == (64, 64)
    c.recorder.flush()
    c.projector.wait_for(c.store.max_position(), 5.0)
    query = GetGenerationQuery(generation_id=again[0].generation_id)
    view = c.queries.dispatch(query, ALICE).data
    assert view.spec["init_image"]["generation_id"] == gid
    assert "data" not in view.spec["init_image"]  # the record keeps hashes, never bytes
    request = GenerationRequest(
        model="sd", prompt="x", steps=2, init_image=ImageInput(generation_id=gid)
    )
    with pytest.raises(NotFoundError):
        c.commands.dispatch(SubmitGenerationCommand(request=request), BOB).unwrap()
    beyond = dataclasses.replace(request, init_image=ImageInput(generation_id=gid, image_index=3))
    with pytest.raises(ValidationError) as err:
        c.commands.dispatch(SubmitGenerationCommand(request=beyond), ALICE).unwrap()
    assert err.value.violations[0].field == "spec.init_image.generated.image_index"


def test_img2img_images_do_not_depend_on_their_batch(c: Container) -> None:
    """Two jobs with different init images and masks in one batch give the images each gets
    alone (within 1 per 8-bit value, the tolerance of every batching test)."""
    specs: list[dict[str, Any]] = [
        {"init_image": ImageInput(data=png(noise(64, 64, 5))), "seed": 1},
        {"init_image": ImageInput(data=png(noise(64, 64, 6))), "seed": 2, "prompt": "a hare"},
    ]
    alone = [np.asarray(image_of(generate(c, **s)), dtype=np.int16) for s in specs]
    requests = [
        dataclasses.replace(
            GenerationRequest(model="sd", prompt="a red fox", steps=4, seed=11), **s
        )
        for s in specs
    ]
    submitted = [
        c.commands.dispatch(SubmitGenerationCommand(request=r), ALICE).unwrap()[0] for r in requests
    ]
    together = []
    for gid in submitted:
        handle = c.generations.handle(str(gid))
        assert handle is not None
        events = list(handle.events())
        assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 2 for e in events)
        together.append(np.asarray(image_of(events), dtype=np.int16))
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("name", list(bad_images()))
def test_bad_input_images_are_refused_with_the_field_and_nothing_is_queued(
    c: Container, name: str
) -> None:
    data = bad_images()[name]
    request = GenerationRequest(model="sd", prompt="x", steps=2, init_image=ImageInput(data=data))
    with pytest.raises(ValidationError) as err:
        c.commands.dispatch(SubmitGenerationCommand(request=request), ALICE).unwrap()
    assert [v.field for v in err.value.violations] == ["spec.init_image"]
    message = err.value.violations[0].description
    assert "Error" not in message
    assert "Traceback" not in message
    assert c.executor.queue_depth() == 0
    assert not c.executor.running


@pytest.mark.parametrize("name", list(odd_images()))
def test_odd_but_valid_images_are_accepted(c: Container, name: str) -> None:
    events = generate(c, init_image=ImageInput(data=odd_images()[name]), steps=2)
    assert image_of(events).size == (64, 64)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"strength": 0.5}, "spec.strength"),
        ({"mask_image": ImageInput(data=b"x")}, "spec.mask_image"),
        (
            {"init_image": ImageInput(data=png(noise(64, 64))), "strength": 1.5},
            "spec.strength",
        ),
        (
            {"init_image": ImageInput(data=png(noise(64, 64))), "inpaint_only_masked": True},
            "spec.inpaint_only_masked",
        ),
        (
            {
                "init_image": ImageInput(data=png(noise(64, 64))),
                "mask_image": ImageInput(data=png(square_mask(32, 32, (0, 0, 8, 8)))),
            },
            "spec.mask_image",
        ),
        (
            {
                "init_image": ImageInput(data=png(noise(64, 64))),
                "mask_image": ImageInput(data=png(Image.new("L", (64, 64)))),
            },
            "spec.mask_image",
        ),
    ],
    ids=[
        "strength alone",
        "mask alone",
        "strength 1.5",
        "only masked alone",
        "mask size",
        "black mask",
    ],
)
def test_inconsistent_image_fields_name_the_field(
    c: Container, spec: dict[str, Any], field: str
) -> None:
    request = dataclasses.replace(GenerationRequest(model="sd", prompt="x", steps=2), **spec)
    with pytest.raises(ValidationError) as err:
        c.commands.dispatch(SubmitGenerationCommand(request=request), ALICE).unwrap()
    assert field in [v.field for v in err.value.violations]


# -- hires fix -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd", "sdxl"])
@pytest.mark.parametrize("upscaler", ["", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_fix_paints_the_upscaled_first_pass_and_counts_both_passes(
    c: Container, model: str, upscaler: str
) -> None:
    hires = HiresRequest(scale=1.5, steps=4, denoising_strength=0.5, upscaler=upscaler)
    events = generate(c, model=model, width=72, height=64, steps=3, hires=hires)
    image = image_of(events)
    assert image.size == (104, 96)  # 1.5 x, rounded down to multiples of 8
    # 3 steps, then 4 x 0.5 = 2: one progress bar over both passes.
    assert progress(events) == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    parameters = image.info["parameters"]
    assert "Size: 72x64" in parameters  # A1111 records the first pass's size
    name = upscaler or "Latent"
    assert f"Hires upscale: 1.5, Hires steps: 4, Hires upscaler: {name}" in parameters
    assert "Denoising strength: 0.5" in parameters
    manifest = json.loads(image.info["loracle"])
    assert manifest["hires"]["upscaler"] == name


def test_hires_images_do_not_depend_on_their_batch(c: Container) -> None:
    hires = HiresRequest(scale=2.0, steps=2)
    alone = [
        np.asarray(image_of(generate(c, width=64, height=64, seed=s, hires=hires)), dtype=np.int16)
        for s in (1, 2)
    ]
    both = generate(c, width=64, height=64, seed=1, num_images=2, hires=hires)
    assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 2 for e in both)
    for index, expected in enumerate(alone):
        assert np.abs(np.asarray(image_of(both, index), dtype=np.int16) - expected).max() <= 1


@pytest.mark.parametrize(
    ("hires", "extra", "field"),
    [
        (HiresRequest(scale=1.0), {}, "spec.hires.scale"),
        (HiresRequest(scale=5.0), {}, "spec.hires.scale"),
        (HiresRequest(scale=2.0, upscaler="4x-UltraSharp"), {}, "spec.hires.upscaler"),
        (HiresRequest(scale=2.0, denoising_strength=0.0), {}, "spec.hires.denoising_strength"),
        (HiresRequest(scale=2.0, steps=500), {}, "spec.hires.steps"),
        (HiresRequest(scale=4.0), {"width": 1024, "height": 1024}, "spec.hires.scale"),
        (
            HiresRequest(scale=2.0),
            {"init_image": ImageInput(data=png(noise(64, 64)))},
            "spec.hires",
        ),
    ],
    ids=["scale 1", "scale 5", "unknown upscaler", "strength 0", "steps", "too large", "img2img"],
)
def test_bad_hires_requests_name_the_field(
    c: Container, hires: HiresRequest, extra: dict[str, Any], field: str
) -> None:
    request = GenerationRequest(model="sd", prompt="x", steps=2, hires=hires, **extra)
    with pytest.raises(ValidationError) as err:
        c.commands.dispatch(SubmitGenerationCommand(request=request), ALICE).unwrap()
    assert field in [v.field for v in err.value.violations]
    if field == "spec.hires.upscaler":
        assert "Latent (nearest-exact)" in err.value.violations[0].description
