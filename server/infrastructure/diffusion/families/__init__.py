"""The pipeline families this server runs. Adding one is a module beside these and a line in
FAMILIES (docs/model-families.md)."""

from __future__ import annotations

from server.domain.models import Architecture
from server.infrastructure.diffusion.families.base import ModelFamily
from server.infrastructure.diffusion.families.flux import Flux
from server.infrastructure.diffusion.families.qwen_image import QwenImage
from server.infrastructure.diffusion.families.sd import StableDiffusion
from server.infrastructure.diffusion.families.sd3 import StableDiffusion3
from server.infrastructure.diffusion.families.sdxl import StableDiffusionXL
from server.infrastructure.diffusion.families.z_image import ZImage

__all__ = ["FAMILIES", "ModelFamily", "family_for", "supported"]

FAMILIES: tuple[ModelFamily, ...] = (
    StableDiffusion(),
    StableDiffusionXL(),
    Flux(),
    StableDiffusion3(),
    QwenImage(),
    ZImage(),
)


def family_for(architecture: Architecture) -> ModelFamily | None:
    """The family serving `architecture`, or None when no family does (not supported yet)."""
    return next((f for f in FAMILIES if architecture in f.architectures), None)


def supported() -> tuple[Architecture, ...]:
    return tuple(a for family in FAMILIES for a in family.architectures)
