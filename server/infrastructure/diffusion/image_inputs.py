"""What a job's input images become before its denoising call, and what its output becomes
after, as A1111 does it:

- img2img: the init image resized to the job's size ("just resize", Lanczos).
- inpainting, whole picture: image and blurred mask resized to the job's size; the output is
  laid over the resized image through the mask, so pixels the mask leaves out keep their
  values exactly.
- inpainting, only masked: the region of the blurred mask plus the padding, widened to the
  job's aspect ratio, is cropped from image and mask and scaled to the job's size; the
  output is scaled back and laid over the whole init image through the mask, so the result
  has the init image's size.

Region, blur and overlay are diffusers' own (`VaeImageProcessor.get_crop_region`, `blur`,
`apply_overlay`), which follow A1111's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.domain.generation_job import GenerationJob
from server.infrastructure.input_images import open_mask, open_rgb


def _same(image: Any) -> Any:
    return image


@dataclass(frozen=True, slots=True)
class RowInputs:
    """One row's image and mask as the pipeline takes them (None for text to image), and
    what turns the pipeline's output into the delivered image."""

    image: Any = None
    mask: Any = None
    finish: Callable[[Any], Any] = _same


def prepare(job: GenerationJob) -> RowInputs:
    """The row inputs of `job` (every image of a job has the same ones)."""
    if job.init_image is None:
        return RowInputs()
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    size = (job.width, job.height)
    init = open_rgb(job.init_image.data)
    if job.mask_image is None:
        return RowInputs(image=init.resize(size, Image.Resampling.LANCZOS))
    overlay = VaeImageProcessor()
    mask = open_mask(job.mask_image.data)
    if job.mask_blur:
        mask = VaeImageProcessor.blur(mask, job.mask_blur)
    if job.inpaint_only_masked:
        box = VaeImageProcessor.get_crop_region(mask, job.width, job.height, job.inpaint_padding)
        return RowInputs(
            image=init.crop(box).resize(size, Image.Resampling.LANCZOS),
            mask=mask.crop(box).resize(size, Image.Resampling.LANCZOS),
            finish=lambda out: overlay.apply_overlay(mask, init, out, box),
        )
    scaled = init.resize(size, Image.Resampling.LANCZOS)
    scaled_mask = mask.resize(size, Image.Resampling.LANCZOS)
    return RowInputs(
        image=scaled,
        mask=scaled_mask,
        finish=lambda out: overlay.apply_overlay(scaled_mask, scaled, out),
    )
