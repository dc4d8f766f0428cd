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

- ControlNet: each control image cropped to the job's aspect ratio around its centre and
  scaled to the job's size (A1111's "Crop and Resize"); with "only masked", first scaled to
  the init image's size and cropped with it, so the control lines up with what is painted.

Region, blur and overlay are diffusers' own (`VaeImageProcessor.get_crop_region`, `blur`,
`apply_overlay`), which follow A1111's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    # One control image per ControlNet of the job, at the job's size.
    controls: tuple[Any, ...] = ()


def prepare(job: GenerationJob) -> RowInputs:
    """The row inputs of `job` (every image of a job has the same ones)."""
    inputs = _prepare_images(job)
    if not job.controls:
        return inputs
    box = inputs.box if isinstance(inputs, _Cropped) else None
    return replace(inputs, controls=tuple(_control(job, c.image.data, box) for c in job.controls))


def controls_at(jobs: Sequence[GenerationJob], width: int, height: int) -> list[list[Any]]:
    """Per ControlNet, each job's control image at another size (a hires fix's second pass,
    which is text to image's: never cropped)."""
    if not jobs or not jobs[0].controls:
        return []
    return [
        [crop_and_resize(open_rgb(job.controls[c].image.data), width, height) for job in jobs]
        for c in range(len(jobs[0].controls))
    ]


def crop_and_resize(image: Any, width: int, height: int) -> Any:
    """A1111's "Crop and Resize": the largest centred region of the target's aspect ratio,
    scaled to width x height."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def _control(job: GenerationJob, data: bytes, box: tuple[int, int, int, int] | None) -> Any:
    from PIL import Image

    image = open_rgb(data)
    if box is None or job.init_image is None:
        return crop_and_resize(image, job.width, job.height)
    whole = crop_and_resize(image, job.init_image.width, job.init_image.height)
    return whole.crop(box).resize((job.width, job.height), Image.Resampling.LANCZOS)


@dataclass(frozen=True, slots=True)
class _Cropped(RowInputs):
    """An "only masked" row: the crop box in the init image, which control images share."""

    box: tuple[int, int, int, int] = (0, 0, 0, 0)


def _prepare_images(job: GenerationJob) -> RowInputs:
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
        return _Cropped(
            box=box,
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
