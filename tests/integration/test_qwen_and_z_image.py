"""Qwen-Image and Z-Image as families, each on a tiny random-weight pipeline built locally (an
MMDiT or single-stream DiT, a 16-channel VAE, a two-layer Qwen2.5-VL or Qwen3 text encoder with
a local byte-level tokenizer) and loaded through the real loading code: guidance and negative
prompts as each family takes them, previews, img2img and inpainting, the same image whatever
the batch, LoRAs in diffusers/peft, kohya and ai-toolkit (`diffusion_model.`) formats applied
and removed exactly, and what a family does not take refused before queueing."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.application.commands import (
    CancelGenerationCommand,
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
from server.devtools.tiny_loras import LoraFormat, write_lora_for_pipeline
from server.devtools.tiny_upscalers import write_tiny_compact
from server.domain import generation_events as gen
from server.domain.errors import ValidationError
from server.domain.generation import GenerationState
from server.domain.models import (
    Architecture,
    BaseModelConfig,
    GenerationDefaults,
    UpscalerModelConfig,
)
from server.infrastructure.diffusion.placeholder import build_tiny_qwen_image, build_tiny_z_image
from server.infrastructure.diffusion.registry import load_pipeline
from tests.hostile_images import noise
from tests.support import image_of, pixels, png, streamed_events

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
FORMATS: tuple[LoraFormat, ...] = ("peft", "kohya", "diffusion_model")


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: Architecture
    build: Callable[[Path], Path]
    defaults: GenerationDefaults
    # The tiny VAE's downsampling: previews are at latent resolution.
    latent_side: int
    # The tiny models' widths are no real model's: Qwen-Image's attention keys alone could be
    # SD3's, so its files say what they are, as trainers write it.
    lora_metadata: dict[str, str]
    # A guidance at which the negative prompt counts.
    guided: float


FAMILIES = {
    "qwen": Family(
        Architecture.QWEN_IMAGE,
        build_tiny_qwen_image,
        GenerationDefaults(1328, 1328, 50, 4.0),
        16,
        {"modelspec.architecture": "qwen-image/lora"},
        4.0,
    ),
    "zimage": Family(
        Architecture.Z_IMAGE,
        build_tiny_z_image,
        GenerationDefaults(1024, 1024, 9, 0.0),
        32,
        {},
        4.0,
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, family: Family) -> BaseModelConfig:
    folder = family.build(tmp_path_factory.mktemp(family.architecture.value) / "tiny")
    return BaseModelConfig("m", family.architecture, folder)


@pytest.fixture(scope="module")
def lora_root(
    tmp_path_factory: pytest.TempPathFactory, model: BaseModelConfig, family: Family
) -> Path:
    """The same LoRA weights (one seed) in each format."""
    root = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(model)
    for fmt in FORMATS:
        path = root / f"ink_{fmt}.safetensors"
        write_lora_for_pipeline(pipe, path, fmt=fmt, seed=6, metadata=family.lora_metadata)
    return root


@pytest.fixture
def c(tmp_path: Path, model: BaseModelConfig, lora_root: Path) -> Iterator[Container]:
    compact = write_tiny_compact(tmp_path / "compact.safetensors")
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=(model,),
        batch_wait_ms=300,
        lora_roots=(lora_root,),
        upscalers=(UpscalerModelConfig("4x-Compact", compact),),
    )
    container = bootstrap(settings)
    yield container
    container.close()


def request(**spec: Any) -> GenerationRequest:
    base = GenerationRequest(model="m", prompt="a red fox", steps=4, seed=5, width=64, height=64)
    return dataclasses.replace(base, **spec)


def events_of(c: Container, **spec: Any) -> list[gen.GenerationEvent]:
    return streamed_events(c, request(**spec), ALICE)


def test_listed_with_what_the_family_takes(c: Container, family: Family) -> None:
    (info,) = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data.models
    assert info.ready, info.error
    assert info.config.architecture is family.architecture
    assert info.defaults == family.defaults
    assert info.schedulers == ("flow_euler",)
    assert info.takes_negative_prompt
    assert info.size_multiple == 16
    assert info.hires_fix


def test_generates_with_previews_and_takes_guidance_and_a_negative_prompt(
    c: Container, family: Family
) -> None:
    events = events_of(c, preview_every_n_steps=2, guidance_scale=family.guided)
    image = image_of(events)
    assert image.size == (64, 64)
    assert f"CFG scale: {family.guided:g}" in image.info["parameters"]
    previews = [e.payload for e in events if isinstance(e.payload, gen.Preview)]
    assert [p.step for p in previews] == [2]
    side = family.latent_side
    assert Image.open(io.BytesIO(previews[0].jpeg)).size == (side, side)
    guided = pixels(events)
    assert np.array_equal(pixels(events_of(c, guidance_scale=family.guided)), guided)
    negative = pixels(events_of(c, guidance_scale=family.guided, negative_prompt="blurry"))
    assert not np.array_equal(negative, guided)
    # Unguided (Qwen-Image at 1, Z-Image Turbo at its default 0): one pass per step.
    assert not np.array_equal(pixels(events_of(c, guidance_scale=1.0)), guided)


def test_img2img_inpainting_and_the_same_image_whatever_the_batch(c: Container) -> None:
    init = png(noise(64, 64, 3))
    assert image_of(events_of(c, init_image=ImageInput(data=init), strength=0.5)).size == (64, 64)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    painted = events_of(
        c, init_image=ImageInput(data=init), mask_image=ImageInput(data=png(mask)), mask_blur=0
    )
    kept = np.asarray(mask) == 0
    original = np.asarray(Image.open(io.BytesIO(init)))
    assert np.array_equal(pixels(painted)[kept], original[kept])
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


def test_loras_in_each_format_give_the_same_image_and_come_off_exactly(
    c: Container, family: Family
) -> None:
    updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), ALICE))
    assert updates[-1].totals.registered == len(FORMATS), updates[-1]
    c.projector.catch_up()
    for fmt in FORMATS:
        (lora,) = c.read_model.find_by_file_name(f"ink_{fmt}")
        assert lora.metadata.base_model.architecture is family.architecture, fmt
    plain = pixels(events_of(c))
    styled = [pixels(events_of(c, loras=(LoraChoice(f"ink_{f}", 1.0),))) for f in FORMATS]
    assert not np.array_equal(styled[0], plain)
    for fmt, image in zip(FORMATS[1:], styled[1:], strict=True):
        assert np.abs(image - styled[0]).max() <= 1, fmt  # one conversion, not a new LoRA
    assert np.array_equal(pixels(events_of(c)), plain)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "4x-Compact"])
def test_a_hires_fix_upscales_latents_or_images_and_paints_them_again(
    c: Container, family: Family, upscaler: str
) -> None:
    """Lanczos and an upscaler model (running in the transformer's device and dtype) upscale
    the decoded image; neither family's img2img in diffusers takes latents (Qwen-Image's
    refuses them, Z-Image's resizes them as pixels), so latent upscalers are refused before
    queueing."""
    hires = HiresRequest(scale=2.0, steps=4, upscaler=upscaler)  # second pass at 0.7
    if upscaler == "Latent":
        with pytest.raises(ValidationError) as err:
            events_of(c, hires=hires)
        (violation,) = err.value.violations
        assert violation.field == "spec.hires.upscaler"
        assert "takes no latents in its second pass; use Lanczos, Nearest" in violation.description
        return
    events = events_of(c, hires=hires)
    assert image_of(events).size == (128, 128)
    progress = [
        (e.payload.step, e.payload.total_steps)
        for e in events
        if isinstance(e.payload, gen.Progress)
    ]
    # 4 first-pass steps, then the 3 that flow matching's img2img runs at 0.7.
    assert progress == [(step, 7) for step in range(1, 8)]
    assert not np.array_equal(pixels(events), pixels(events_of(c, hires=None, width=128)))


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({"scheduler": "dpmpp_2m"}, "spec.scheduler", "samples with flow_euler"),
        ({"width": 72}, "spec.width", "takes sizes in multiples of 16"),
    ],
)
def test_what_the_family_does_not_take_is_refused_before_queueing(
    c: Container, spec: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(ValidationError) as err:
        events_of(c, **spec)
    (violation,) = err.value.violations
    assert violation.field == field
    assert says in violation.description


def test_a_running_generation_is_cancelled_between_steps(c: Container) -> None:
    """The pipeline's step callback stops the call, as for every family."""
    gid = c.commands.dispatch(
        SubmitGenerationCommand(request=request(steps=150, prompt="slow")), ALICE
    ).unwrap()[0]
    handle = c.generations.handle(str(gid))
    assert handle is not None
    for event in handle.events():
        if isinstance(event.payload, gen.Progress):
            break
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=str(gid)), ALICE).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED
    events = list(handle.events())
    assert isinstance(events[-1].payload, gen.Cancelled)
    assert not any(isinstance(e.payload, gen.ImageChunk) for e in events)
    assert max(e.payload.step for e in events if isinstance(e.payload, gen.Progress)) < 150
