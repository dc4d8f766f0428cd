"""A1111's hires fix between its two passes: the first pass's latents (or decoded images)
upscaled to the hires size, and the second pass that paints them again, as img2img."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.domain.generation_job import GenerationJob, Mode
from server.domain.upscalers import find_upscaler
from server.infrastructure.diffusion.families.base import DenoisePass, ModelFamily


def second_steps(job: GenerationJob, family: ModelFamily) -> int:
    """How many steps the second pass runs (for progress): steps x strength as the family's
    img2img pipeline rounds it, at least 1."""
    assert job.hires is not None
    return family.img2img_steps(job.hires.steps or job.steps, job.hires.denoising_strength)


def second_pass(
    job: GenerationJob,
    first: Any,
    pipe: Any,
    model: Callable[[Any], Any] | None = None,
    family: ModelFamily | None = None,
) -> tuple[DenoisePass, Any]:
    """The second call and its input: the first pass's output (latents for a latent
    upscaler, else PIL images) upscaled to the hires size; `model` upscales one image by its
    native factor when the job names an upscaler model. Latents are resized as
    (rows, channels, h, w): a `family` that packs them unpacks them first and gives its
    img2img pipeline the shape it takes."""
    assert job.hires is not None
    width, height = job.hires.size(job.width, job.height)
    call = DenoisePass(
        Mode.IMAGE_TO_IMAGE,
        width,
        height,
        job.hires.steps or job.steps,
        job.hires.denoising_strength,
    )
    if job.hires.model is not None:
        assert model is not None
        return call, [with_model(model, image, width, height) for image in first]
    upscaler = find_upscaler(job.hires.upscaler)
    assert upscaler is not None
    if upscaler.latent:
        import torch

        factor = pipe.vae_scale_factor
        size = (height // factor, width // factor)
        antialias = upscaler.antialias and upscaler.mode in ("bilinear", "bicubic")
        if family is not None:
            first = family.preview_latents(pipe, first, job.width, job.height)
        upscaled = torch.nn.functional.interpolate(
            first, size=size, mode=upscaler.mode, antialias=antialias
        )
        return call, upscaled if family is None else family.img2img_latents(upscaled)
    from PIL import Image

    resample = Image.Resampling.LANCZOS if upscaler.mode == "lanczos" else Image.Resampling.NEAREST
    return call, [image.resize((width, height), resample) for image in first]


def with_model(model: Callable[[Any], Any], image: Any, width: int, height: int) -> Any:
    """As A1111 upscales with a model: by its native factor until the image covers the
    target (at most three times), then Lanczos to the exact size."""
    from PIL import Image

    for _ in range(3):
        if image.width >= width and image.height >= height:
            break
        image = model(image)
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
