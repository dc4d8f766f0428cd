"""Z-Image (Turbo and base): a single-stream DiT on FLUX's 16-channel VAE latents, conditioned on
the second-to-last hidden states of a Qwen3 language model read through its chat template.
Turbo is distilled to 8 denoising steps without guidance; at a guidance above 0 the pipeline
runs classifier-free guidance with the negative prompt (the base model's way)."""

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
    prompt_arguments,
    transformer_call,
)
from server.infrastructure.diffusion.families.flux import Flux
from server.infrastructure.diffusion.families.transformer_file import (
    StateDict,
    load_transformer_file,
)

TRANSFORMER = CheckpointPart(
    "the Z-Image transformer (context_refiner.*)",
    ("context_refiner.", "model.diffusion_model.context_refiner."),
)


class ZImage(ModelFamily):
    architectures = (Architecture.Z_IMAGE,)
    pipeline_classes = frozenset({"ZImagePipeline"})
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    # Z-Image-Turbo's published settings: 1024x1024, 9 steps (8 transformer passes) and no
    # guidance; a base model's `[[models]]` entry sets its own (steps = 28, guidance = 4).
    defaults = GenerationDefaults(1024, 1024, 9, 0.0)
    denoiser = "transformer"
    compiled_blocks = ("ZImageTransformerBlock",)
    lora_components = ("transformer",)
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "ZImageImg2ImgPipeline",
        Mode.INPAINT: "ZImageInpaintPipeline",
    }
    # Alibaba PAI's Z-Image ControlNets (Union, 1.0 and 2.x; diffusers folders), one at a time
    # (diffusers has no class running several) and in text to image only: diffusers has no
    # Z-Image ControlNet img2img pipeline, and its ControlNet inpainting one is for inpainting
    # ControlNets (which take the masked image themselves). Its pipeline takes no step range:
    # the ControlNet steers every step.
    controlnet_pipelines = {Mode.TEXT_TO_IMAGE: "ZImageControlNetPipeline"}
    controlnet_class = "ZImageControlNetModel"
    multi_controlnet_class = None
    controlnet_step_range = False
    schedulers = FLOW_SCHEDULERS
    # diffusers' Z-Image img2img does not know its latents' 16 channels (its image processor
    # is built without vae_latent_channels) and resizes latents as if they were pixels:
    # hires fix with image upscalers only.
    latent_hires = False
    # A single file is the transformer in its original layout (fused qkv; diffusers
    # converts it), ComfyUI's prefixed one, or a GGUF of either; the rest is config_dir's.
    denoiser_file = True
    size_multiple = 16  # 8x VAE, 2x2 patches
    # The FLUX VAE: FLUX's fit applies.
    preview_factors = Flux.preview_factors
    preview_bias = Flux.preview_bias

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (TRANSFORMER,)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return flow_matching_img2img_steps(steps, strength)

    def pipeline_class(self) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def load_single_file(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        from diffusers import ZImageTransformer2DModel

        return load_transformer_file(
            config,
            torch_dtype,
            transformer_class=ZImageTransformer2DModel,
            pipeline_class=self.pipeline_class(),
            convert=pad_tokens_as_parameters,
        )

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """The pipeline encodes its own prompts; a negative prompt counts only with guidance
        above 0, where each step runs the transformer twice."""
        return transformer_call(
            pipe,
            rows,
            on_step,
            control_step_range=self.controlnet_step_range,
            **prompt_arguments(rows),
        )


# The learned pad embeddings the transformer writes into padded positions (not matmuls).
_PAD_TOKENS = ("x_pad_token", "cap_pad_token")


def pad_tokens_as_parameters(checkpoint: StateDict) -> StateDict:
    """The pad tokens as the model's (1, dim) parameters: some GGUF conversions store them
    as (dim,) vectors (leejet's), or quantize them (a quantized tensor cannot be assigned into
    activations), and diffusers takes neither."""
    out = dict(checkpoint)
    for key, tensor in checkpoint.items():
        if key.rsplit(".", 1)[-1] not in _PAD_TOKENS:
            continue
        if getattr(tensor, "quant_type", None) is not None:
            from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

            tensor = dequantize_gguf_tensor(tensor)
        out[key] = tensor.reshape(1, -1).float()
    return out
