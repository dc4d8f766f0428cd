"""SD3.5, Qwen-Image and Z-Image ControlNets (diffusers folders) through the command bus and the
real executor, on the tiny pipelines and tiny random-weight ControlNets made for them: checked
at start-up, a control image steers the image and counts for nothing at weight 0, several at
once where diffusers runs several (Qwen-Image: one Union ControlNet over several images), the
step range where the pipeline takes one, and what diffusers' pipelines cannot run (img2img,
inpainting, the hires fix's img2img pass, Z-Image's several ControlNets and step range)
refused before queueing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.application.commands import ControlChoice, GenerationRequest, HiresRequest, ImageInput
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.domain.errors import PreconditionError, Reason, ValidationError
from server.domain.models import Architecture, BaseModelConfig, ControlNetConfig
from server.infrastructure.diffusion.controlnets import inspect_controlnet
from server.infrastructure.diffusion.placeholder import (
    build_tiny_qwen_image,
    build_tiny_qwen_image_controlnet,
    build_tiny_sd3,
    build_tiny_sd3_controlnet,
    build_tiny_z_image,
    build_tiny_z_image_controlnet,
)
from tests.hostile_images import noise
from tests.support import pixels, png, streamed_events

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
EDGES = png(noise(120, 80, 1))  # another aspect ratio than the images: cropped, then scaled
DEPTH = png(noise(64, 64, 2))
SD3, QWEN, Z = Architecture.SD3, Architecture.QWEN_IMAGE, Architecture.Z_IMAGE
# Each model's ControlNets, and the size it is tested at (Z-Image's tiny pipeline is the
# slowest on the CPU).
CONTROLNETS = {"sd3": ("sd3-a", "sd3-b"), "qwen": ("qwen-a", "qwen-b"), "z": ("z-a",)}
SIDES = {"sd3": 64, "qwen": 64, "z": 64}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transformer-controlnets")
    sd3, qwen = build_tiny_sd3(root / "sd3"), build_tiny_qwen_image(root / "qwen")
    z = build_tiny_z_image(root / "z")
    return {
        "sd3": sd3,
        "qwen": qwen,
        "z": z,
        "sd3-a": build_tiny_sd3_controlnet(root / "sd3-a", sd3, seed=1),
        "sd3-b": build_tiny_sd3_controlnet(root / "sd3-b", sd3, seed=2),
        "sd3-narrow": build_tiny_sd3_controlnet(root / "sd3-narrow", sd3, text_width=16),
        "qwen-a": build_tiny_qwen_image_controlnet(root / "qwen-a", qwen, seed=1),
        "qwen-b": build_tiny_qwen_image_controlnet(root / "qwen-b", qwen, seed=2),
        "z-a": build_tiny_z_image_controlnet(root / "z-a", z, seed=1),
    }


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Iterator[Container]:
    architectures = {"sd3": SD3, "qwen": QWEN, "z": Z}
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        storage_url="memory://",
        models=tuple(BaseModelConfig(m, a, files[m]) for m, a in architectures.items()),
        controlnets=tuple(
            ControlNetConfig(name, architectures[name.split("-")[0]], files[name])
            for name in ("sd3-a", "sd3-b", "sd3-narrow", "qwen-a", "qwen-b", "z-a")
        ),
    )
    container = bootstrap(settings)
    yield container
    container.close()


def generate(c: Container, model: str, **spec: Any) -> np.ndarray[Any, np.dtype[np.int16]]:
    side = SIDES[model]
    base = GenerationRequest(
        model=model, prompt="a red fox", steps=2, seed=11, width=side, height=side
    )
    return pixels(streamed_events(c, dataclasses.replace(base, **spec), ALICE))


def control(name: str, data: bytes = EDGES, **fields: Any) -> ControlChoice:
    return ControlChoice(name, ImageInput(data=data), **fields)


def refused(c: Container, model: str, **spec: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as err:
        generate(c, model, **spec)
    return [(v.field, v.description) for v in err.value.violations]


def test_they_are_checked_and_listed(c: Container, files: dict[str, Path]) -> None:
    listing = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data
    assert all(n.ready for n in listing.controlnets), [n.error for n in listing.controlnets]
    as_qwen = inspect_controlnet(ControlNetConfig("x", QWEN, files["sd3-a"]))
    assert "describes a SD3ControlNetModel, not a QwenImageControlNetModel" in as_qwen.error
    as_z = inspect_controlnet(ControlNetConfig("y", Z, files["qwen-a"]))
    assert "describes a QwenImageControlNetModel, not a ZImageControlNetModel" in as_z.error
    single = inspect_controlnet(
        ControlNetConfig("w", SD3, files["sd3-a"] / "diffusion_pytorch_model.safetensors")
    )
    assert "SD3 ControlNets are loaded from diffusers folders" in single.error


@pytest.mark.parametrize("model", ["sd3", "qwen", "z"])
def test_a_control_image_steers_and_a_weight_of_zero_changes_nothing(
    c: Container, model: str
) -> None:
    name = CONTROLNETS[model][0]
    plain = generate(c, model)
    steered = generate(c, model, controls=(control(name),))
    assert not np.array_equal(steered, plain)
    assert not np.array_equal(generate(c, model, controls=(control(name, DEPTH),)), steered)
    # The same seed makes the same image again (SD3's pipeline would sample the control
    # image's latents from torch's global generator: families/sd3.py samples them from the
    # job's).
    assert np.array_equal(generate(c, model, controls=(control(name),)), steered)
    # At weight 0 the control image no longer counts (SD3's and Qwen-Image's latents of it
    # are sampled from the job's generator first, so it is not the uncontrolled image;
    # Z-Image takes the latents' mean and draws nothing).
    muted = generate(c, model, controls=(control(name, conditioning_scale=0.0),))
    other = generate(c, model, controls=(control(name, DEPTH, conditioning_scale=0.0),))
    assert np.abs(muted - other).max() <= 1
    if model == "z":
        assert np.abs(muted - plain).max() <= 1


@pytest.mark.parametrize("model", ["sd3", "qwen"])
def test_several_control_images_and_the_step_range(c: Container, model: str) -> None:
    first, second = CONTROLNETS[model]
    # SD3 runs two ControlNets; Qwen-Image one (Union) ControlNet over two images.
    other = second if model == "sd3" else first
    one = generate(c, model, controls=(control(first),))
    both = generate(c, model, controls=(control(first), control(other, DEPTH)))
    assert not np.array_equal(both, one)
    # Images pair with their ControlNets: at weight 0 the second's image does not count.
    muted = generate(
        c, model, controls=(control(first), control(other, DEPTH, conditioning_scale=0.0))
    )
    swapped = generate(
        c, model, controls=(control(first), control(other, EDGES, conditioning_scale=0.0))
    )
    assert np.abs(muted - swapped).max() <= 1
    # Steering the first step only is neither steering both nor none.
    early = generate(c, model, controls=(control(first, guidance_end=0.5),))
    late = generate(c, model, controls=(control(first, guidance_start=0.5),))
    assert not np.array_equal(early, one)
    assert not np.array_equal(early, late)


def test_qwen_image_takes_one_controlnet_and_z_image_one_image(c: Container) -> None:
    assert refused(c, "qwen", controls=(control("qwen-a"), control("qwen-b"))) == [
        (
            "spec.controls[1].controlnet",
            "model 'qwen' (QWEN_IMAGE) runs several control images through one ControlNet "
            "(a Union one), not several ControlNets: name 'qwen-a' here too",
        )
    ]
    assert refused(c, "z", controls=(control("z-a"), control("z-a", DEPTH))) == [
        (
            "spec.controls",
            "model 'z' (Z_IMAGE) takes one ControlNet at a time: diffusers has no class "
            "running several of its ControlNets",
        )
    ]
    assert refused(c, "z", controls=(control("z-a", guidance_end=0.5),)) == [
        (
            "spec.controls[0].guidance_end",
            "model 'z' (Z_IMAGE) has its ControlNets steer every step (diffusers' pipeline "
            "takes no step range): leave guidance_start at 0 and guidance_end at 1",
        )
    ]
    assert c.executor.queue_depth() == 0


@pytest.mark.parametrize("model", ["sd3", "qwen", "z"])
def test_only_text_to_image_takes_controlnets(c: Container, model: str) -> None:
    side = SIDES[model]
    controls = (control(CONTROLNETS[model][0]),)
    init = ImageInput(data=png(noise(side, side, 3)))
    mask = Image.new("L", (side, side))
    mask.paste(255, (8, 8, side - 8, side - 8))
    arch = {"sd3": "SD3", "qwen": "QWEN_IMAGE", "z": "Z_IMAGE"}[model]
    where = f"model {model!r} ({arch}) runs ControlNets in text to image only"
    assert refused(c, model, init_image=init, controls=controls) == [
        ("spec.init_image", f"{where}: diffusers has no img2img pipeline for its ControlNets")
    ]
    painting = refused(
        c, model, init_image=init, mask_image=ImageInput(data=png(mask)), controls=controls
    )
    assert painting == [
        ("spec.mask_image", f"{where}: diffusers has no pipeline inpainting with its ControlNets")
    ]
    hires = HiresRequest(scale=2.0, steps=1, upscaler="Lanczos")
    assert refused(c, model, hires=hires, controls=controls) == [
        ("spec.hires", f"{where}, and the hires fix's second pass is img2img")
    ]
    assert c.executor.queue_depth() == 0
    generate(c, model, init_image=init, strength=0.5)  # without ControlNets: served


def test_a_controlnet_for_another_text_encoder_fails_the_job_with_its_reason(
    c: Container,
) -> None:
    with pytest.raises(PreconditionError) as err:
        generate(c, "sd3", controls=(control("sd3-narrow"),))
    assert err.value.reason is Reason.CONTROLNET_LOAD_FAILED
    assert err.value.message == (
        "ControlNet 'sd3-narrow' takes a 16-wide text embedding, the model gives 32: it was "
        "trained for another base model"
    )
