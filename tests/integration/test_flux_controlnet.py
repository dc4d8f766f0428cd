"""FLUX ControlNets (InstantX layout, diffusers folders) through the command bus and the real
executor, on the tiny FLUX pipeline and a tiny ControlNet built from its transformer: checked
at start-up, a control image steers the image and counts for nothing at weight 0, two at
once (diffusers' FluxMultiControlNetModel), every mode (img2img, inpainting, hires fix), the
parameters A1111 reads, and what cannot serve FLUX refused before queueing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.application.commands import (
    ControlChoice,
    GenerationRequest,
    HiresRequest,
    ImageInput,
)
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain.errors import PreconditionError, ValidationError
from server.domain.models import Architecture, BaseModelConfig, ControlNetConfig
from server.infrastructure.diffusion.controlnets import inspect_controlnet
from server.infrastructure.diffusion.placeholder import (
    build_tiny_controlnet,
    build_tiny_flux,
    build_tiny_flux_controlnet,
    build_tiny_sd15,
)
from tests.hostile_images import noise
from tests.support import image_of, pixels, png, streamed_events

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
EDGES = png(noise(120, 80, 1))  # another aspect ratio than the images: cropped, then scaled
DEPTH = png(noise(64, 64, 2))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-controlnets")
    flux = build_tiny_flux(root / "flux")
    sd = build_tiny_sd15(root / "sd")
    return {
        "flux": flux,
        "canny": build_tiny_flux_controlnet(root / "canny", flux, seed=1),
        "depth": build_tiny_flux_controlnet(root / "depth", flux, seed=2),
        "sd-canny": build_tiny_controlnet(root / "sd-canny", sd),
    }


@pytest.fixture
def c(tmp_path: Path, files: dict[str, Path]) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=(BaseModelConfig("flux", Architecture.FLUX, files["flux"]),),
        controlnets=(
            ControlNetConfig("canny", Architecture.FLUX, files["canny"]),
            ControlNetConfig("depth", Architecture.FLUX, files["depth"]),
            ControlNetConfig("sd-canny", Architecture.SD1, files["sd-canny"]),
        ),
    )
    container = bootstrap(settings)
    yield container
    container.close()


def generate(c: Container, **spec: Any) -> np.ndarray[Any, np.dtype[np.int16]]:
    base = GenerationRequest(
        model="flux", prompt="a red fox", steps=3, seed=11, width=64, height=64
    )
    return pixels(streamed_events(c, dataclasses.replace(base, **spec), ALICE))


def control(name: str = "canny", data: bytes = EDGES, **fields: Any) -> ControlChoice:
    return ControlChoice(name, ImageInput(data=data), **fields)


def test_flux_controlnets_are_checked_and_listed(c: Container, files: dict[str, Path]) -> None:
    listing = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data
    ready = {n.config.name: n.ready for n in listing.controlnets}
    assert ready == {"canny": True, "depth": True, "sd-canny": True}
    # An SD ControlNet configured as FLUX, and a FLUX one as SDXL, say what they are.
    as_flux = inspect_controlnet(ControlNetConfig("x", Architecture.FLUX, files["sd-canny"]))
    assert "describes a ControlNetModel, not a FluxControlNetModel" in as_flux.error
    as_xl = inspect_controlnet(ControlNetConfig("y", Architecture.SDXL, files["canny"]))
    assert "describes a FluxControlNetModel, not a ControlNetModel" in as_xl.error
    single = inspect_controlnet(
        ControlNetConfig(
            "z", Architecture.FLUX, files["canny"] / "diffusion_pytorch_model.safetensors"
        )
    )
    assert "FLUX ControlNets are loaded from diffusers folders" in single.error
    as_sd3 = inspect_controlnet(ControlNetConfig("w", Architecture.SD3, files["canny"]))
    assert "describes a FluxControlNetModel, not a SD3ControlNetModel" in as_sd3.error


def test_a_control_image_steers_and_a_weight_of_zero_changes_nothing(c: Container) -> None:
    plain = generate(c)
    canny = generate(c, controls=(control(),))
    assert not np.array_equal(canny, plain)
    assert not np.array_equal(generate(c, controls=(control(data=DEPTH),)), canny)
    # At weight 0 the control image no longer counts. (It is not the uncontrolled image:
    # diffusers samples the control image's latents from the job's generator first, so the
    # noise differs; SD's ControlNets draw nothing.)
    muted = generate(c, controls=(control(conditioning_scale=0.0),))
    other = generate(c, controls=(control(data=DEPTH, conditioning_scale=0.0),))
    assert np.abs(muted - other).max() <= 1
    both = generate(c, controls=(control(), control("depth", DEPTH)))
    assert not np.array_equal(both, canny)
    # Images pair with their ControlNets: at weight 0 the second's image does not count,
    # the first's does.
    muted_second = (control(), control("depth", DEPTH, conditioning_scale=0.0))
    alone = generate(c, controls=muted_second)
    swapped = generate(c, controls=(control(), control("depth", EDGES, conditioning_scale=0.0)))
    assert np.abs(alone - swapped).max() <= 1
    first = generate(c, controls=(control(data=DEPTH), muted_second[1]))
    assert not np.array_equal(first, alone)


def test_every_mode_takes_controls_and_the_png_says_so(c: Container) -> None:
    init = png(noise(64, 64, 3))
    img2img = {"init_image": ImageInput(data=init), "strength": 0.6}
    plain = generate(c, **img2img)
    assert not np.array_equal(generate(c, **img2img, controls=(control(),)), plain)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    painted = generate(
        c, **img2img, mask_image=ImageInput(data=png(mask)), mask_blur=0, controls=(control(),)
    )
    kept = np.asarray(mask) == 0
    assert np.array_equal(painted[kept], pixels_of(init)[kept])
    request = GenerationRequest(
        model="flux", prompt="a red fox", steps=3, seed=11, width=64, height=64,
        hires=HiresRequest(scale=2.0, steps=2, upscaler="Lanczos"), controls=(control(),),
    )  # fmt: skip
    image = image_of(streamed_events(c, request, ALICE))
    assert image.size == (128, 128)
    assert 'ControlNet 0: "Module: none, Model: canny [' in image.info["parameters"]


def pixels_of(data: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_what_cannot_serve_flux_is_refused_before_queueing(c: Container) -> None:
    with pytest.raises(PreconditionError) as other:
        generate(c, controls=(control("sd-canny"),))
    assert other.value.reason == "CONTROLNET_ARCHITECTURE_MISMATCH"
    # diffusers' FLUX ControlNet img2img takes latents for pixels: no latent hires with one.
    with pytest.raises(ValidationError) as latent:
        generate(c, controls=(control(),), hires=HiresRequest(scale=2.0, upscaler="Latent"))
    assert latent.value.violations[0].description.endswith(
        "takes no latents in its second pass with ControlNets; use Lanczos, Nearest or an "
        "upscaler model"
    )
    with pytest.raises(ValidationError) as cfg:
        generate(c, controls=(control(),), true_cfg_scale=3.0, negative_prompt="blurry")
    assert cfg.value.violations[0].field == "spec.true_cfg_scale"
    assert c.executor.queue_depth() == 0
