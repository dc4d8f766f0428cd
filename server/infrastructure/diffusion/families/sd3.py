"""Stable Diffusion 3.5 (large, medium): an MMDiT transformer on 16-channel latents, two CLIP
text encoders (their pooled outputs joined) and a T5 (optional in the model: the sequence),
flow matching with a fixed shift, classifier-free guidance with a negative prompt."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.domain.generation_job import Mode
from server.domain.models import Architecture, BaseModelConfig, GenerationDefaults
from server.domain.schedulers import FLOW_SCHEDULERS
from server.infrastructure.diffusion.conditioning import ConditionedGroup, RowScope, all_rows
from server.infrastructure.diffusion.families.base import (
    BatchRows,
    CheckpointPart,
    ModelFamily,
    StepCallback,
    flow_matching_img2img_steps,
    prompt_arguments,
    transformer_call,
)
from server.infrastructure.diffusion.families.transformer_file import load_transformer_file
from server.infrastructure.diffusion.quantization import pipeline_quantization
from server.infrastructure.diffusion.transformer_conditioning import encode_sd3

MMDIT = CheckpointPart(
    "the MMDiT (joint_blocks.*)", ("model.diffusion_model.joint_blocks.", "joint_blocks.")
)


class StableDiffusion3(ModelFamily):
    architectures = (Architecture.SD3,)
    pipeline_classes = frozenset({"StableDiffusion3Pipeline"})
    # T5 (text_encoder_3, tokenizer_3) is optional: without it the pipeline pads the CLIP
    # embeddings in its place (less prompt adherence, several GB less memory).
    components = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    # SD3.5 Large's: 28 steps at CFG 3.5.
    defaults = GenerationDefaults(1024, 1024, 28, 3.5)
    denoiser = "transformer"
    compiled_blocks = ("JointTransformerBlock",)
    lora_components = ("transformer", "text_encoder", "text_encoder_2")
    mode_pipelines = {
        Mode.IMAGE_TO_IMAGE: "StableDiffusion3Img2ImgPipeline",
        Mode.INPAINT: "StableDiffusion3InpaintPipeline",
    }
    # InstantX's and Stability's SD3/SD3.5 ControlNets (diffusers folders), in text to image
    # only: diffusers has no SD3 ControlNet img2img pipeline, and its ControlNet inpainting
    # one is for inpainting ControlNets (which take the masked image themselves).
    controlnet_pipelines = {Mode.TEXT_TO_IMAGE: "StableDiffusion3ControlNetPipeline"}
    controlnet_class = "SD3ControlNetModel"
    multi_controlnet_class = "SD3MultiControlNetModel"
    schedulers = FLOW_SCHEDULERS
    size_multiple = 16  # 8x VAE, 2x2 patches
    # A single file is Stability's MMDiT (safetensors or GGUF); the rest is config_dir's.
    denoiser_file = True
    # Least-squares fit of latent -> RGB published with ComfyUI (16 channels).
    preview_factors = (
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    )
    preview_bias = (0.2394, 0.2135, 0.1925)

    def checkpoint_parts(self, architecture: Architecture) -> tuple[CheckpointPart, ...]:
        return (MMDIT,)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return flow_matching_img2img_steps(steps, strength)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load_folder(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(
            str(config.path),
            local_files_only=True,
            torch_dtype=torch_dtype,
            **_without_t5(config.path),
            **pipeline_quantization(config, self.denoiser),
        )

    def load_single_file(self, config: BaseModelConfig, torch_dtype: Any) -> Any:
        """diffusers converts the MMDiT layout itself (at the file's own widths)."""
        from diffusers import SD3Transformer2DModel

        assert config.config_dir is not None  # inspect_model requires it
        return load_transformer_file(
            config,
            torch_dtype,
            transformer_class=SD3Transformer2DModel,
            pipeline_class=self.pipeline_class(),
            **_without_t5(config.config_dir),
        )

    def encode(
        self,
        pipe: Any,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        scope: RowScope = all_rows,
    ) -> list[ConditionedGroup]:
        """A1111's syntax on both CLIPs and T5: transformer_conditioning.py."""
        return encode_sd3(pipe, prompts, negative_prompts, scope)

    def denoise(self, pipe: Any, rows: BatchRows, on_step: StepCallback) -> Sequence[Any]:
        """The rows' embeddings (`encode`), negative ones included."""
        if not rows.job.controls:
            return transformer_call(pipe, rows, on_step, **prompt_arguments(rows))
        with control_latents_sampled_from(pipe.vae, rows.generators):
            return transformer_call(pipe, rows, on_step, **prompt_arguments(rows))


@contextmanager
def control_latents_sampled_from(vae: Any, generators: list[Any]) -> Iterator[None]:
    """diffusers' SD3 ControlNet pipeline samples the control images' latents from torch's
    global generator (FLUX's and Qwen-Image's sample them from the call's generators): here
    from each row's own generator, so that a seed makes the same image again whatever ran
    before. Under classifier-free guidance it encodes every control image twice (the
    unconditional rows first), each row's drawn from its generator again."""
    encode = vae.encode

    def seeded(images: Any, *args: Any, **kwargs: Any) -> Any:
        out = encode(images, *args, **kwargs)
        if len(images) % len(generators):
            return out
        rows = generators * (len(images) // len(generators))
        dist = out.latent_dist
        draw = dist.sample
        dist.sample = lambda generator=None: draw(rows if generator is None else generator)
        return out

    vae.encode = seeded
    try:
        yield
    finally:
        del vae.encode  # the class's method again


def _without_t5(folder: Path) -> dict[str, Any]:
    """Without a T5 folder, as diffusers documents it: the pipeline told there is none."""
    if (folder / "text_encoder_3").is_dir():
        return {}
    return {"text_encoder_3": None, "tokenizer_3": None}
