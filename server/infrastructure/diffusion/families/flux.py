"""FLUX.1 (dev and schnell): a flow-matching transformer on 16-channel latents packed in 2x2
patches, a CLIP text encoder (pooled) and a T5 one (the sequence). Guidance-distilled: the
request's guidance is the guidance the transformer embeds, and there is no negative prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.domain.generation_job import Mode
from server.domain.models import Architecture, GenerationDefaults
from server.domain.schedulers import FLOW_SCHEDULERS
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
    flow_matching_img2img_steps,
    transformer_call,
)

TRANSFORMER = CheckpointPart(
    "the FLUX transformer (double_blocks.*)",
    ("double_blocks.", "model.diffusion_model.double_blocks."),
)


class Flux(ModelFamily):
    architectures = (Architecture.FLUX,)
    pipeline_classes = frozenset({"FluxPipeline"})
    components = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    # FLUX.1-dev's: 28 steps at a distilled guidance of 3.5.
    defaults = GenerationDefaults(1024, 1024, 28, 3.5)
    denoiser = "transformer"
    lora_components = ("transformer", "text_encoder")
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "FluxImg2ImgPipeline",
        Mode.INPAINT: "FluxInpaintPipeline",
    }
    schedulers = FLOW_SCHEDULERS
    takes_negative_prompt = False
    distilled_guidance = True
    # Its latents are packed: the latent upscalers do not apply (not built yet).
    hires_fix = False
    # BFL's single files (and GGUF) are not converted and tested yet: folders only.
    single_file = False
    # Least-squares fit of latent -> RGB published with ComfyUI (16 channels).
    preview_factors = (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    )
    preview_bias = (-0.0329, -0.0718, -0.0851)

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (TRANSFORMER,)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return flow_matching_img2img_steps(steps, strength)

    def pipeline_class(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """(rows, patches, 64) packed latents -> (rows, 16, h, w)."""
        if latents.dim() != 3:
            return latents
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """FluxPipeline encodes its own prompts (CLIP pooled, T5 sequence); guidance_scale is
        the embedded guidance, and no negative prompt is passed (the application refuses
        one)."""
        return transformer_call(pipe, rows, on_step, prompt=rows.prompts)
