"""Stable Diffusion XL: one UNet, two text encoders (CLIP ViT-L and OpenCLIP bigG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.domain.generation_job import Mode
from server.domain.models import Architecture, GenerationDefaults
from server.infrastructure.diffusion.conditioning import TextEncoder
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
    text_to_image,
)
from server.infrastructure.diffusion.families.sd import UNET, VAE

# The keys diffusers' CHECKPOINT_KEY_NAMES uses to recognise each text encoder.
CLIP_SDXL = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP_SDXL = "conditioner.embedders.1.model.positional_embedding"


class StableDiffusionXL(ModelFamily):
    architectures = (Architecture.SDXL,)
    # A dedicated inpainting model's folder names the inpainting pipeline.
    pipeline_classes = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"})
    components = (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    defaults = GenerationDefaults(1024, 1024, 30, 5.0)
    lora_components = ("unet", "text_encoder", "text_encoder_2")
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "StableDiffusionXLImg2ImgPipeline",
        Mode.INPAINT: "StableDiffusionXLInpaintPipeline",
    }
    controlnet_pipelines = {
        Mode.TEXT_TO_IMAGE: "StableDiffusionXLControlNetPipeline",
        Mode.IMAGE_TO_IMAGE: "StableDiffusionXLControlNetImg2ImgPipeline",
        Mode.INPAINT: "StableDiffusionXLControlNetInpaintPipeline",
    }
    text_encoders = (
        TextEncoder("tokenizer", "text_encoder", penultimate=True),
        TextEncoder("tokenizer_2", "text_encoder_2", penultimate=True, pooled=True),
    )
    # Least-squares fit of latent -> RGB published with A1111/ComfyUI.
    preview_factors = (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    )
    preview_bias = (0.1084, -0.0175, -0.0011)

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (
            UNET,
            VAE,
            CheckpointPart(f"the CLIP text encoder ({CLIP_SDXL})", (CLIP_SDXL,)),
            CheckpointPart(f"the OpenCLIP text encoder ({OPEN_CLIP_SDXL})", (OPEN_CLIP_SDXL,)),
        )

    def check_checkpoint_header(self, path: Path, header: dict[str, Any]) -> str:
        # diffusers tells SDXL's two text encoders apart by their width (768 and 1280).
        widths = {int(header[key]["shape"][-1]) for key in (CLIP_SDXL, OPEN_CLIP_SDXL)}
        if len(widths) == 1:
            return (
                f"{path}: both SDXL text encoders are {widths.pop()} wide, so diffusers "
                "cannot tell them apart"
            )
        return ""

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        return text_to_image(pipe, rows, on_step)
