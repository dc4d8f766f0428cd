"""ControlNet through the command bus and the real executor, on tiny random-weight SD1.5 and
SDXL pipelines and ControlNets built from their UNets (diffusers layout, folder and single
file): a control image steers the image and a weight of 0 leaves it exactly as without, each
row keeps its own control image whatever the batch, several ControlNets at once, every mode
(img2img, only-masked inpainting, hires fix), and a ControlNet that cannot serve the model
refused before anything is queued, or failed with its reason when it will not load."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.application.commands import (
    ControlChoice,
    GenerateImageCommand,
    GenerationRequest,
    HiresRequest,
    ImageInput,
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext
from server.application.queries import GetGenerationQuery, ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.single_file import write_single_file_controlnet
from server.domain import generation_events as gen
from server.domain.errors import (
    NotFoundError,
    PreconditionError,
    Reason,
    ValidationError,
)
from server.domain.models import Architecture, BaseModelConfig, ControlNetConfig
from server.infrastructure.diffusion.controlnets import WEIGHTS, inspect_controlnet
from server.infrastructure.diffusion.placeholder import (
    build_tiny_controlnet,
    build_tiny_sd15,
    build_tiny_sdxl,
)
from tests.hostile_images import noise

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


EDGES = png(noise(120, 80, 1))  # another aspect ratio than the images: cropped, then scaled
DEPTH = png(noise(64, 64, 2))


@dataclasses.dataclass(frozen=True)
class Files:
    models: tuple[BaseModelConfig, ...]
    controlnets: tuple[ControlNetConfig, ...]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("controlnet")
    sd = build_tiny_sd15(root / "sd")
    xl = build_tiny_sdxl(root / "sdxl")
    canny = build_tiny_controlnet(root / "canny", sd)
    # A single file in diffusers' layout, beside a folder holding only its config.
    (root / "depth-config").mkdir()
    build_tiny_controlnet(root / "depth-src", sd, seed=5)
    shutil.copy(root / "depth-src" / "config.json", root / "depth-config" / "config.json")
    shutil.copy(root / "depth-src" / WEIGHTS, root / "depth.safetensors")
    narrow = _controlnet_of_another_width(root / "narrow")
    # The original (lllyasviel) layout, as most SD1 ControlNets are shared.
    write_single_file_controlnet(canny, root / "canny-original.safetensors")
    return Files(
        (
            BaseModelConfig("sd", Architecture.SD1, sd),
            BaseModelConfig("sdxl", Architecture.SDXL, xl),
        ),
        (
            ControlNetConfig("canny", Architecture.SD1, canny),
            ControlNetConfig(
                "depth", Architecture.SD1, root / "depth.safetensors", root / "depth-config"
            ),
            ControlNetConfig("canny-xl", Architecture.SDXL, build_tiny_controlnet(root / "cx", xl)),
            ControlNetConfig("narrow", Architecture.SD1, narrow),
            ControlNetConfig(
                "canny-original", Architecture.SD1, root / "canny-original.safetensors", canny
            ),
            ControlNetConfig("missing", Architecture.SD1, root / "nowhere"),
        ),
    )


def _controlnet_of_another_width(folder: Path) -> Path:
    """An SD1-layout ControlNet trained for a 16-wide text encoder (the tiny SD1 is 32)."""
    from diffusers import ControlNetModel

    ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=32,
        conditioning_embedding_out_channels=(16, 32),
    ).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def c(tmp_path: Path, files: Files) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=files.models,
        controlnets=files.controlnets,
        max_batch=8,
        batch_wait_ms=300,
    )
    container = bootstrap(settings)
    yield container
    container.close()


def request(**spec: Any) -> GenerationRequest:
    base = GenerationRequest(model="sd", prompt="a red fox", steps=3, seed=11, width=64, height=64)
    return dataclasses.replace(base, **spec)


def events_of(c: Container, **spec: Any) -> list[gen.GenerationEvent]:
    return list(c.commands.stream(GenerateImageCommand(request=request(**spec)), ALICE))


def generate(c: Container, **spec: Any) -> Image.Image:
    events = events_of(c, **spec)
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return Image.open(io.BytesIO(data))


def pixels(image: Image.Image) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.asarray(image, dtype=np.int16)


def control(name: str = "canny", data: bytes = EDGES, **fields: Any) -> ControlChoice:
    return ControlChoice(name, ImageInput(data=data), **fields)


# --- start-up checks -------------------------------------------------------------------------


def test_controlnets_are_checked_at_start_up_and_listed(c: Container, files: Files) -> None:
    listing = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data
    status = {x.config.name: (x.ready, x.error) for x in listing.controlnets}
    assert status["canny"] == (True, "")
    assert status["depth"] == (True, "")  # a single file with its config_dir
    assert status["canny-xl"] == (True, "")
    ready, error = status["missing"]
    assert not ready
    assert "does not exist" in error
    assert [u.name for u in listing.upscalers][:1] == ["Latent"]
    folder = files.controlnets[0].path
    as_xl = inspect_controlnet(ControlNetConfig("x", Architecture.SDXL, folder))
    assert not as_xl.ready
    assert as_xl.error.endswith("describes an SD1/SD2 ControlNet, not SDXL")
    no_config = inspect_controlnet(
        ControlNetConfig("x", Architecture.SD1, files.controlnets[1].path)
    )
    assert "needs config_dir" in no_config.error


def test_pickle_and_non_controlnet_files_are_not_ready(tmp_path: Path, files: Files) -> None:
    pickle = tmp_path / "control.pth"
    pickle.write_bytes(b"\x80\x04")
    assert (
        "only .safetensors"
        in inspect_controlnet(ControlNetConfig("p", Architecture.SD1, pickle, tmp_path)).error
    )
    unet = files.models[0].path / "unet" / WEIGHTS  # a safetensors file, but a UNet
    assert (
        "is not a ControlNet"
        in inspect_controlnet(ControlNetConfig("u", Architecture.SD1, unet, tmp_path)).error
    )
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(files.controlnets[0].path / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    assert (
        "pickle can run code"
        in inspect_controlnet(ControlNetConfig("b", Architecture.SD1, folder)).error
    )


# --- steering --------------------------------------------------------------------------------


def test_a_control_image_steers_and_a_weight_of_zero_changes_nothing(c: Container) -> None:
    plain = pixels(generate(c))
    steered = pixels(generate(c, controls=(control(),)))
    assert np.abs(steered - plain).mean() > 1.0
    assert np.array_equal(pixels(generate(c, controls=(control(),))), steered)
    other_image = pixels(generate(c, controls=(control(data=DEPTH),)))
    assert not np.array_equal(other_image, steered)
    # Weight 0 adds nothing at all.
    assert close(pixels(generate(c, controls=(control(conditioning_scale=0.0),))), plain)
    weaker = pixels(generate(c, controls=(control(conditioning_scale=0.5),)))
    assert np.abs(weaker - plain).mean() > 0.1
    late = pixels(generate(c, controls=(control(guidance_start=0.5),)))
    assert not np.array_equal(late, steered)
    assert not np.array_equal(late, plain)


def test_an_original_layout_file_is_the_same_controlnet(c: Container, files: Files) -> None:
    steered = pixels(generate(c, controls=(control(),)))
    assert np.array_equal(pixels(generate(c, controls=(control("canny-original"),))), steered)
    # diffusers cannot convert an SDXL one in that layout: said at start-up.
    xl_folder = files.controlnets[2].path
    original_xl = write_single_file_controlnet(xl_folder, xl_folder.parent / "xl-orig.safetensors")
    info = inspect_controlnet(ControlNetConfig("x", Architecture.SDXL, original_xl, xl_folder))
    assert not info.ready
    assert "an SDXL ControlNet in the original layout" in info.error


def test_several_controlnets_and_a_single_file_one(c: Container) -> None:
    canny = pixels(generate(c, controls=(control(),)))
    depth = pixels(generate(c, controls=(control("depth", DEPTH),)))
    both = pixels(generate(c, controls=(control(), control("depth", DEPTH))))
    assert not np.array_equal(both, canny)
    assert not np.array_equal(both, depth)
    # The second one at weight 0 is the first alone: images pair with their ControlNets.
    muted = generate(c, controls=(control(), control("depth", DEPTH, conditioning_scale=0.0)))
    assert close(pixels(muted), canny)


def close(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """Equal within 1 per 8-bit value, the tolerance of every batching test."""
    return bool(np.abs(a - b).max() <= 1)


def test_each_row_keeps_its_control_image_whatever_the_batch(c: Container) -> None:
    specs = [
        {"seed": 1, "controls": (control(data=EDGES),)},
        {"seed": 2, "prompt": "a hare", "controls": (control(data=DEPTH),)},
    ]
    alone = [pixels(generate(c, **s)) for s in specs]
    submitted = [
        c.commands.dispatch(SubmitGenerationCommand(request=request(**s)), ALICE).unwrap()[0]
        for s in specs
    ]
    together = []
    for gid in submitted:
        handle = c.generations.handle(str(gid))
        assert handle is not None
        events = list(handle.events())
        assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 2 for e in events)
        chunks = [e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk)]
        together.append(pixels(Image.open(io.BytesIO(b"".join(chunks)))))
    assert all(close(a, b) for a, b in zip(alone, together, strict=True))


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_every_mode_takes_controls(c: Container, model: str) -> None:
    name = "canny" if model == "sd" else "canny-xl"
    init = png(noise(96, 64, 3))
    mask = Image.new("L", (96, 64))
    mask.paste(255, (30, 20, 60, 44))
    controlled = (control(name),)
    img2img = dict(model=model, init_image=ImageInput(data=init), strength=0.6, width=0, height=0)
    plain = pixels(generate(c, **img2img))
    assert not np.array_equal(pixels(generate(c, **img2img, controls=controlled)), plain)
    inpaint = generate(
        c,
        model=model,
        init_image=ImageInput(data=init),
        mask_image=ImageInput(data=png(mask)),
        inpaint_only_masked=True,
        mask_blur=0,
        controls=controlled,
    )
    assert inpaint.size == (96, 64)
    kept = np.asarray(mask) == 0
    assert np.array_equal(pixels(inpaint)[kept], pixels(Image.open(io.BytesIO(init)))[kept])
    hires = generate(c, model=model, hires=HiresRequest(scale=1.5, steps=2), controls=controlled)
    assert hires.size == (96, 96)


# --- refusals and failures -------------------------------------------------------------------


def test_a_controlnet_that_cannot_serve_the_model_is_refused_before_queueing(c: Container) -> None:
    with pytest.raises(NotFoundError) as missing:
        events_of(c, controls=(control("scribble"),))
    assert missing.value.reason is Reason.CONTROLNET_NOT_FOUND
    assert "there are: canny, depth, canny-xl, narrow, canny-original, missing" in (
        missing.value.message
    )
    with pytest.raises(PreconditionError) as other:
        events_of(c, model="sdxl", controls=(control("canny"),))
    assert other.value.reason is Reason.CONTROLNET_ARCHITECTURE_MISMATCH
    assert other.value.metadata == {
        "controlnet": "canny",
        "controlnet_architecture": "SD1",
        "model": "sdxl",
        "model_architecture": "SDXL",
    }
    with pytest.raises(PreconditionError) as broken:
        events_of(c, controls=(control("missing"),))
    assert broken.value.reason is Reason.CONTROLNET_NOT_READY
    assert c.executor.queue_depth() == 0


@pytest.mark.parametrize(
    ("choice", "field"),
    [
        (ControlChoice("canny", None), "spec.controls[0].image"),
        (control(conditioning_scale=2.5), "spec.controls[0].conditioning_scale"),
        (control(guidance_start=1.0), "spec.controls[0].guidance_start"),
        (control(guidance_start=0.6, guidance_end=0.4), "spec.controls[0].guidance_end"),
        (control(data=b"not an image"), "spec.controls[0].image"),
        (ControlChoice("", ImageInput(data=EDGES)), "spec.controls[0].controlnet"),
    ],
)
def test_bad_controls_name_the_field(c: Container, choice: ControlChoice, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        events_of(c, controls=(choice,))
    assert [v.field for v in err.value.violations] == [field]


def test_at_most_four_controlnets(c: Container) -> None:
    with pytest.raises(ValidationError) as err:
        events_of(c, controls=(control(),) * 5)
    assert err.value.violations[0].field == "spec.controls"


def test_a_controlnet_for_another_text_encoder_fails_the_job_with_its_reason(
    c: Container,
) -> None:
    with pytest.raises(PreconditionError) as err:
        events_of(c, controls=(control("narrow"),))
    assert err.value.reason is Reason.CONTROLNET_LOAD_FAILED
    assert err.value.message == (
        "ControlNet 'narrow' takes a 16-wide text embedding, the model gives 32: it was "
        "trained for another base model"
    )
    generate(c)  # the model still serves other jobs


# --- metadata --------------------------------------------------------------------------------


def test_metadata_reproduces_the_controls(c: Container, files: Files) -> None:
    image = generate(c, controls=(control(conditioning_scale=0.8, guidance_end=0.9),))
    weights = (files.controlnets[0].path / WEIGHTS).read_bytes()
    short = hashlib.sha256(weights).hexdigest()[:8]
    assert (
        f'ControlNet 0: "Module: none, Model: canny [{short}], Weight: 0.8, Resize Mode: '
        'Crop and Resize, Guidance Start: 0, Guidance End: 0.9, Control Mode: Balanced"'
    ) in image.info["parameters"]
    manifest = json.loads(image.info["loracle"])
    (recorded,) = manifest["controls"]
    assert recorded["hash"] == short
    assert recorded["image"]["sha256"] == hashlib.sha256(EDGES).hexdigest()
    c.recorder.flush()
    c.projector.wait_for(c.store.max_position(), 5.0)
    query = GetGenerationQuery(generation_id=manifest["generation_id"])
    view = c.queries.dispatch(query, ALICE).data
    assert view.spec["controls"][0]["conditioning_scale"] == 0.8
    assert view.spec["controls"][0]["image"]["sha256"] == hashlib.sha256(EDGES).hexdigest()
