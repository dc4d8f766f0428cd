"""Qwen-Image: a 60-block MMDiT on 16-channel latents of the Wan 2.1 VAE, packed in 2x2 patches,
conditioned on the hidden states of a Qwen2.5-VL language model (no CLIP, no pooled vector).
Not guidance-distilled: the request's guidance is true classifier-free guidance
(`true_cfg_scale`), which diffusers runs only with a negative prompt, so an empty one is
passed as a single space, as Qwen's own examples do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.domain.generation_job import Mode
from server.domain.models import Architecture, BaseModelConfig, GenerationDefaults
from server.domain.schedulers import FLOW_SCHEDULERS
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
    flow_matching_img2img_steps,
    plain_prompts,
    transformer_call,
)
from server.infrastructure.diffusion.families.transformer_file import (
    StateDict,
    load_transformer_file,
)

COMFY_PREFIX = "model.diffusion_model."

# The original (ComfyUI) layout names the blocks as diffusers does.
TRANSFORMER = CheckpointPart(
    "the Qwen-Image transformer (transformer_blocks.*.img_mlp)",
    ("transformer_blocks.0.img_mlp.", "model.diffusion_model.transformer_blocks.0.img_mlp."),
)
# diffusers' Qwen pipelines run classifier-free guidance only when given a negative prompt.
EMPTY_NEGATIVE = " "


class QwenImage(ModelFamily):
    architectures = (Architecture.QWEN_IMAGE,)
    pipeline_classes = frozenset({"QwenImagePipeline"})
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    # Qwen-Image's published settings: 1328x1328 (its 1:1 training size), 50 steps, CFG 4.
    defaults = GenerationDefaults(1328, 1328, 50, 4.0)
    denoiser = "transformer"
    compiled_blocks = ("QwenImageTransformerBlock",)
    # Its LoRAs train the transformer only (the 7B text encoder is never a LoRA target).
    lora_components = ("transformer",)
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "QwenImageImg2ImgPipeline",
        Mode.INPAINT: "QwenImageInpaintPipeline",
    }
    # InstantX's Qwen-Image ControlNets (Union too; diffusers folders), in text to image only:
    # diffusers has no Qwen-Image ControlNet img2img pipeline, and its ControlNet inpainting
    # one is for inpainting ControlNets (which take the masked image themselves).
    controlnet_pipelines = {Mode.TEXT_TO_IMAGE: "QwenImageControlNetPipeline"}
    controlnet_class = "QwenImageControlNetModel"
    # It runs one (Union) ControlNet over several control images, not several ControlNets.
    multi_controlnet_class = "QwenImageMultiControlNetModel"
    several_controlnets = False
    schedulers = FLOW_SCHEDULERS
    # diffusers' Qwen img2img takes no latents for `image` (its preprocessing refuses the
    # video VAE's 5-D latents and misreads 4-D ones): hires fix with image upscalers only.
    latent_hires = False
    # A single file is the transformer (ComfyUI's, diffusers' names under
    # `model.diffusion_model.`, or a GGUF of it); the rest is config_dir's.
    denoiser_file = True
    size_multiple = 16  # 8x VAE, 2x2 patches
    # ComfyUI's least-squares fit for the Wan 2.1 VAE's 16 normalised channels.
    preview_factors = (
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    )
    preview_bias = (-0.1835, -0.0868, -0.3360)

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (TRANSFORMER,)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return flow_matching_img2img_steps(steps, strength)

    def pipeline_class(self) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def load_single_file(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        """diffusers maps a Qwen-Image file's keys as they are: the ComfyUI prefix goes
        first."""
        from diffusers import QwenImageTransformer2DModel

        return load_transformer_file(
            config,
            torch_dtype,
            transformer_class=QwenImageTransformer2DModel,
            pipeline_class=self.pipeline_class(),
            convert=without_prefix,
        )

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """(rows, patches, 64) packed latents -> (rows, 16, h, w): the VAE's frame axis
        (a video VAE: one frame) is dropped."""
        if latents.dim() != 3:
            return latents
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """guidance_scale is Qwen's true CFG scale; at 1 or less it runs unguided (one
        transformer pass per step), as diffusers does. Prompts go as plain text: its language
        model takes no emphasis (`plain_prompts`)."""
        guided = rows.job.guidance_scale > 1
        negatives = plain_prompts(rows.negative_prompts)
        negative = [n or EMPTY_NEGATIVE for n in negatives] if guided else None
        return transformer_call(
            pipe,
            rows,
            on_step,
            prompt=plain_prompts(rows.prompts),
            negative_prompt=negative,
            guidance_argument="true_cfg_scale",
        )


def without_prefix(checkpoint: StateDict) -> StateDict:
    """ComfyUI's `model.diffusion_model.` prefix off every key."""
    return {key.removeprefix(COMFY_PREFIX): value for key, value in checkpoint.items()}
