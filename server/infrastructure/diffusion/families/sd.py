"""Stable Diffusion 1.x and 2.x: one UNet, one text encoder (CLIP for SD1, OpenCLIP for SD2)."""

from __future__ import annotations

from collections.abc import Sequence
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

UNET = CheckpointPart("the UNet (model.diffusion_model.*)", ("model.diffusion_model.",))
VAE = CheckpointPart("the VAE (first_stage_model.*)", ("first_stage_model.", "vae."))
# The keys diffusers' CHECKPOINT_KEY_NAMES uses to recognise each text encoder.
CLIP_SD1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP_SD2 = "cond_stage_model.model.token_embedding.weight"


class StableDiffusion(ModelFamily):
    architectures = (Architecture.SD1, Architecture.SD2)
    # A dedicated inpainting model's folder names the inpainting pipeline.
    pipeline_classes = frozenset({"StableDiffusionPipeline", "StableDiffusionInpaintPipeline"})
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    defaults = GenerationDefaults(512, 512, 25, 7.0)
    lora_components = ("unet", "text_encoder")
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "StableDiffusionImg2ImgPipeline",
        Mode.INPAINT: "StableDiffusionInpaintPipeline",
    }
    controlnet_pipelines = {
        Mode.TEXT_TO_IMAGE: "StableDiffusionControlNetPipeline",
        Mode.IMAGE_TO_IMAGE: "StableDiffusionControlNetImg2ImgPipeline",
        Mode.INPAINT: "StableDiffusionControlNetInpaintPipeline",
    }
    text_encoders = (TextEncoder("tokenizer", "text_encoder"),)
    # Least-squares fit of latent -> RGB published with A1111/ComfyUI (SD2 uses it too).
    preview_factors = (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    )

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        if architecture is Architecture.SD2:
            encoder = CheckpointPart(
                f"the OpenCLIP text encoder ({OPEN_CLIP_SD2})", (OPEN_CLIP_SD2,)
            )
        else:
            encoder = CheckpointPart(f"the CLIP text encoder ({CLIP_SD1})", (CLIP_SD1,))
        return (UNET, VAE, encoder)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        # Alone among diffusers' ControlNet pipelines, text to image's takes several
        # ControlNets' images row by row (it transposes nested lists; diffusers 0.42).
        row_first = rows.call.mode == Mode.TEXT_TO_IMAGE
        return text_to_image(pipe, rows, on_step, controls_row_first=row_first)
