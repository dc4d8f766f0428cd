"""A generation request as the commands carry it, and its validation against the limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.domain.errors import FieldViolation
from server.domain.generation_job import Mode
from server.domain.models import BaseModelInfo
from server.domain.schedulers import SCHEDULERS


@dataclass(frozen=True, slots=True)
class LoraChoice:
    lora: str
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An input image as a request names it: inline bytes, or an image of an earlier
    generation (`generation_id`, `image_index`)."""

    data: bytes = b""
    generation_id: str = ""
    image_index: int = 0


@dataclass(frozen=True, slots=True)
class HiresRequest:
    """A1111's hires fix as a request asks for it (0 and None: the defaults)."""

    scale: float = 0.0
    steps: int = 0
    denoising_strength: float | None = None
    upscaler: str = ""


@dataclass(frozen=True, slots=True)
class ControlChoice:
    """A ControlNet as a request asks for it (None: the defaults)."""

    controlnet: str
    image: ImageInput | None = None
    conditioning_scale: float | None = None
    guidance_start: float = 0.0
    guidance_end: float | None = None


# At most this many ControlNets per request (A1111's default "Multi-ControlNet" count is 3).
MAX_CONTROLS = 4
DEFAULT_CONTROL_SCALE = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    model: str = ""
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    # FLUX's true CFG beside its distilled guidance (None: off).
    true_cfg_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = ""
    loras: tuple[LoraChoice, ...] = field(default_factory=tuple)
    output_format: str = "png"
    preview_every_n_steps: int = 0
    chunk_size_bytes: int = 0
    init_image: ImageInput | None = None
    strength: float | None = None
    mask_image: ImageInput | None = None
    mask_blur: int | None = None
    inpaint_only_masked: bool = False
    inpaint_padding: int | None = None
    hires: HiresRequest | None = None
    controls: tuple[ControlChoice, ...] = ()
    # GenerationSpec.upscale was set: it is output only (UpscaleImage makes upscales).
    upscale_given: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class UpscaleRequest:
    """An image to make larger (UpscaleImage): by a configured upscaler model or a built-in
    image upscaler; scale 0: the model's own factor (2 for a built-in one)."""

    image: ImageInput | None
    upscaler: str
    scale: float = 0.0
    output_format: str = "png"
    chunk_size_bytes: int = 0


# Upscale factors a request may ask for (A1111's Extras allow 1 to 8).
MAX_UPSCALE = 8.0
DEFAULT_BUILTIN_UPSCALE = 2.0


def validate_upscale(request: UpscaleRequest) -> list[FieldViolation]:
    out = []
    if request.image is None:
        out.append(FieldViolation("image", "is required: the image to upscale"))
    if not request.upscaler.strip():
        out.append(FieldViolation("upscaler", "must name an upscaler (ListBaseModels lists them)"))
    if request.scale and not 1.0 < request.scale <= MAX_UPSCALE:
        out.append(FieldViolation("scale", f"above 1 and at most {MAX_UPSCALE:g}, or 0"))
    if request.output_format not in FORMATS:
        out.append(FieldViolation("output_format", "png, jpeg or webp"))
    if request.chunk_size_bytes and not 1024 <= request.chunk_size_bytes <= 4 * 1024 * 1024:
        out.append(FieldViolation("chunk_size_bytes", "from 1 KiB to 4 MiB, or 0"))
    return out


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    """What one request may ask for (settings: max_prompt_chars, max_image_side, ...)."""

    prompt_chars: int = 10_000
    side: int = 2048
    pixels: int = 2048 * 2048
    steps: int = 150
    images: int = 8
    loras: int = 8
    input_bytes: int = 8 * 1024 * 1024
    input_pixels: int = 4096 * 4096


DEFAULT_LIMITS = GenerationLimits()
FORMATS = ("png", "jpeg", "webp")
MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


def validate(
    request: GenerationRequest, limits: GenerationLimits = DEFAULT_LIMITS
) -> list[FieldViolation]:
    out = []
    if not request.prompt.strip():
        out.append(FieldViolation("spec.prompt", "must not be empty"))
    if max(len(request.prompt), len(request.negative_prompt)) > limits.prompt_chars:
        out.append(FieldViolation("spec.prompt", f"at most {limits.prompt_chars} characters"))
    for name, value in (("width", request.width), ("height", request.height)):
        if value and (value % 8 or not 64 <= value <= limits.side):
            out.append(
                FieldViolation(f"spec.{name}", f"a multiple of 8 from 64 to {limits.side}, or 0")
            )
    if request.width * request.height > limits.pixels:
        out.append(FieldViolation("spec.width", f"width x height at most {limits.pixels} pixels"))
    if not 0 <= request.steps <= limits.steps:
        out.append(FieldViolation("spec.steps", f"from 1 to {limits.steps}, or 0"))
    if request.guidance_scale is not None and not 0.0 <= request.guidance_scale <= 30.0:
        out.append(FieldViolation("spec.guidance_scale", "from 0 to 30"))
    if request.true_cfg_scale is not None and not 1.0 <= request.true_cfg_scale <= 30.0:
        out.append(FieldViolation("spec.true_cfg_scale", "from 1 to 30"))
    if not 1 <= request.num_images <= limits.images:
        out.append(FieldViolation("spec.num_images", f"from 1 to {limits.images}"))
    # Image i uses seed + i, which must stay a valid int64.
    if request.seed is not None and not 0 <= request.seed <= 2**63 - 1 - limits.images:
        out.append(FieldViolation("spec.seed", f"from 0 to {2**63 - 1 - limits.images}"))
    if request.scheduler and request.scheduler not in SCHEDULERS:
        out.append(FieldViolation("spec.scheduler", f"one of {', '.join(SCHEDULERS)}, or empty"))
    if request.output_format not in FORMATS:
        out.append(FieldViolation("spec.output_format", "png, jpeg or webp"))
    if request.chunk_size_bytes and not 1024 <= request.chunk_size_bytes <= 4 * 1024 * 1024:
        out.append(FieldViolation("spec.chunk_size_bytes", "from 1 KiB to 4 MiB, or 0"))
    if not 0 <= request.preview_every_n_steps <= limits.steps:
        out.append(FieldViolation("spec.preview_every_n_steps", f"from 0 to {limits.steps}"))
    out += _image_violations(request)
    out += _hires_violations(request, limits)
    out += _control_violations(request)
    if request.upscale_given:
        out.append(FieldViolation("spec.upscale", "is output only: call UpscaleImage to upscale"))
    for i, choice in enumerate(request.loras):
        if not choice.lora.strip():
            out.append(FieldViolation(f"spec.loras[{i}].lora", "must not be empty"))
        if choice.weight is not None and not -4.0 <= choice.weight <= 4.0:
            out.append(FieldViolation(f"spec.loras[{i}].weight", "from -4 to 4"))
    return out


def fit_size(
    width: int, height: int, limits: GenerationLimits, multiple: int = 8
) -> tuple[int, int]:
    """An init image's size as the size to generate at: scaled down (keeping its aspect
    ratio) to the limits when larger, then rounded down to the model's multiple, at least
    64."""
    scale = min(1.0, limits.side / max(width, height), (limits.pixels / (width * height)) ** 0.5)
    sides = (max(64, int(side * scale) // multiple * multiple) for side in (width, height))
    return tuple(sides)  # type: ignore[return-value]


def _hires_violations(request: GenerationRequest, limits: GenerationLimits) -> list[FieldViolation]:
    hires = request.hires
    if hires is None:
        return []
    out = []
    if not 1.0 < hires.scale <= 4.0:
        out.append(FieldViolation("spec.hires.scale", "above 1 and at most 4"))
    if not 0 <= hires.steps <= limits.steps:
        out.append(FieldViolation("spec.hires.steps", f"from 0 to {limits.steps}"))
    strength = hires.denoising_strength
    if strength is not None and not 0.0 < strength <= 1.0:
        out.append(FieldViolation("spec.hires.denoising_strength", "above 0 and at most 1"))
    # The upscaler's name is checked against the configured models too (GenerationJobs).
    if request.init_image is not None:
        out.append(
            FieldViolation("spec.hires", "applies to text to image only, not with init_image")
        )
    return out


def _control_violations(request: GenerationRequest) -> list[FieldViolation]:
    if len(request.controls) > MAX_CONTROLS:
        return [FieldViolation("spec.controls", f"at most {MAX_CONTROLS} ControlNets")]
    out = []
    for i, control in enumerate(request.controls):
        where = f"spec.controls[{i}]"
        if not control.controlnet.strip():
            out.append(FieldViolation(f"{where}.controlnet", "must name a configured ControlNet"))
        if control.image is None:
            out.append(FieldViolation(f"{where}.image", "is required: the control image"))
        scale = control.conditioning_scale
        if scale is not None and not 0.0 <= scale <= 2.0:
            out.append(FieldViolation(f"{where}.conditioning_scale", "from 0 to 2"))
        start = control.guidance_start
        end = 1.0 if control.guidance_end is None else control.guidance_end
        if not 0.0 <= start < 1.0:
            out.append(FieldViolation(f"{where}.guidance_start", "from 0 to below 1"))
        elif not start < end <= 1.0:
            out.append(
                FieldViolation(f"{where}.guidance_end", "above guidance_start and at most 1")
            )
    return out


# How sentences name modes.
MODE_NAMES = {
    Mode.TEXT_TO_IMAGE: "text to image",
    Mode.IMAGE_TO_IMAGE: "img2img",
    Mode.INPAINT: "inpainting",
}

# A1111's defaults for what a request leaves unset.
DEFAULT_STRENGTH = 0.75
DEFAULT_HIRES_STRENGTH = 0.7
DEFAULT_MASK_BLUR = 4
DEFAULT_INPAINT_PADDING = 32


def family_control_violations(
    request: GenerationRequest, model: BaseModelInfo
) -> list[FieldViolation]:
    """What the model's family cannot do with the request's ControlNets, as its family
    declares it (BaseModelInfo): a mode without a ControlNet pipeline (the hires fix's second
    pass is img2img), several at once, a step range. A family with no ControlNets at all
    leaves them to be reported not ready."""
    modes = model.controlnet_modes
    if not request.controls or not modes:
        return []
    where = f"model {model.config.name!r} ({model.config.architecture.value})"
    only = " and ".join(MODE_NAMES.get(m, m) for m in modes)
    out = []
    if request.mask_image is not None and Mode.INPAINT not in modes:
        out.append(
            FieldViolation(
                "spec.mask_image",
                f"{where} runs ControlNets in {only} only: diffusers has no pipeline "
                "inpainting with its ControlNets",
            )
        )
    elif request.init_image is not None and Mode.IMAGE_TO_IMAGE not in modes:
        out.append(
            FieldViolation(
                "spec.init_image",
                f"{where} runs ControlNets in {only} only: diffusers has no img2img pipeline "
                "for its ControlNets",
            )
        )
    if request.hires is not None and Mode.IMAGE_TO_IMAGE not in modes:
        out.append(
            FieldViolation(
                "spec.hires",
                f"{where} runs ControlNets in {only} only, and the hires fix's second pass is "
                "img2img",
            )
        )
    controls = request.controls
    if len(controls) > 1 and not model.several_control_images:
        out.append(
            FieldViolation(
                "spec.controls",
                f"{where} takes one ControlNet at a time: diffusers has no class running "
                "several of its ControlNets",
            )
        )
    elif not model.several_controlnets:
        first = controls[0].controlnet
        for i, control in enumerate(controls):
            if control.controlnet != first:
                out.append(
                    FieldViolation(
                        f"spec.controls[{i}].controlnet",
                        f"{where} runs several control images through one ControlNet (a "
                        f"Union one), not several ControlNets: name {first!r} here too",
                    )
                )
    for i, control in enumerate(controls if not model.controlnet_step_range else ()):
        if control.guidance_start != 0.0 or control.guidance_end not in (None, 1.0):
            side = "guidance_start" if control.guidance_start != 0.0 else "guidance_end"
            out.append(
                FieldViolation(
                    f"spec.controls[{i}].{side}",
                    f"{where} has its ControlNets steer every step (diffusers' pipeline takes "
                    "no step range): leave guidance_start at 0 and guidance_end at 1",
                )
            )
    return out


def _image_violations(request: GenerationRequest) -> list[FieldViolation]:
    """The img2img and inpainting fields' ranges, and that they come with an init image."""
    out = []
    if request.strength is not None and not 0.0 < request.strength <= 1.0:
        out.append(FieldViolation("spec.strength", "above 0 and at most 1"))
    if request.mask_blur is not None and not 0 <= request.mask_blur <= 64:
        out.append(FieldViolation("spec.mask_blur", "from 0 to 64 pixels"))
    if request.inpaint_padding is not None and not 0 <= request.inpaint_padding <= 256:
        out.append(FieldViolation("spec.inpaint_padding", "from 0 to 256 pixels"))
    if request.init_image is None:
        needs_init = {
            "spec.strength": request.strength is not None,
            "spec.mask_image": request.mask_image is not None,
        }
        for field_name, present in needs_init.items():
            if present:
                out.append(FieldViolation(field_name, "applies only with spec.init_image"))
    inpainting = {
        "spec.mask_blur": request.mask_blur is not None,
        "spec.inpaint_only_masked": request.inpaint_only_masked,
        "spec.inpaint_padding": request.inpaint_padding is not None,
    }
    if request.mask_image is None:
        for field_name, present in inpainting.items():
            if present:
                out.append(FieldViolation(field_name, "applies only with spec.mask_image"))
    return out


_LORA_TAG = re.compile(r"<(?:lora|lyco):[^>]*>", re.IGNORECASE)


def strip_lora_tags(prompt: str) -> str:
    """What the text encoders see: A1111 `<lora:…>` tags name LoRAs, they are not words."""
    return " ".join(_LORA_TAG.sub(" ", prompt).split())
