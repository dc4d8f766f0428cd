"""A generation request as the commands carry it, and its validation against the limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from server.domain.errors import FieldViolation
from server.domain.schedulers import SCHEDULERS


@dataclass(frozen=True, slots=True)
class LoraChoice:
    lora: str
    weight: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    model: str = ""
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str = ""
    loras: tuple[LoraChoice, ...] = field(default_factory=tuple)
    output_format: str = "png"
    preview_every_n_steps: int = 0
    chunk_size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class GenerationLimits:
    """What one request may ask for (settings: max_prompt_chars, max_image_side, ...)."""

    prompt_chars: int = 10_000
    side: int = 2048
    pixels: int = 2048 * 2048
    steps: int = 150
    images: int = 8
    loras: int = 8


DEFAULT_LIMITS = GenerationLimits()
FORMATS = ("png", "jpeg", "webp")


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
    for i, choice in enumerate(request.loras):
        if not choice.lora.strip():
            out.append(FieldViolation(f"spec.loras[{i}].lora", "must not be empty"))
        if choice.weight is not None and not -4.0 <= choice.weight <= 4.0:
            out.append(FieldViolation(f"spec.loras[{i}].weight", "from -4 to 4"))
    return out


_LORA_TAG = re.compile(r"<(?:lora|lyco):[^>]*>", re.IGNORECASE)


def strip_lora_tags(prompt: str) -> str:
    """What the text encoders see: A1111 `<lora:…>` tags name LoRAs, they are not words."""
    return " ".join(_LORA_TAG.sub(" ", prompt).split())
